"""AnomalyMaps: the pixel-scoring head of ``DN2Module(anomaly_maps=True)``.

It owns the patch pyramid's stage names, the patch bank's life cycle (collect during the bank pass,
finalise with the image bank's rows), the map computation (:meth:`AnomalyMaps.maps_for`) and the pixel
metrics of ``test``. The LightningModule stays glue: it calls :meth:`embed`, :meth:`collect`,
:meth:`finalize`, :meth:`maps_for` and :meth:`update_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dn2_lightning.backbones import FeatureExtractor
from dn2_lightning.distributed import count_rows, gather_objects, gather_rows, unique_by_index, world_size
from dn2_lightning.knn import DEFAULT_MAX_MEMORY_BYTES, KNNBackend, KNNResult, lacks_float64
from dn2_lightning.maps.bank import PatchBank, ensure_room
from dn2_lightning.maps.pyramid import check_layers, embed_with_patches, pyramid_layers
from dn2_lightning.maps.spade import (
    PATCH_BANKS,
    PatchBankName,
    all_patch_scores,
    nearest_image_patch_scores,
    to_image_maps,
)
from dn2_lightning.pixel_metrics import DEFAULT_THRESHOLDS, MapCollector, PixelResults, pixel_metrics

GT_MASK_KEYS = ("gt_mask", "pixel_mask")
GT_REGIONS_KEY = "gt_regions"
Search = Callable[[Tensor, int], KNNResult]


def validate_map_options(patch_bank: str, num_images: int, kappa: int, sigma: float) -> None:
    """Raise ValueError naming the option, its value and the fix."""
    if patch_bank not in PATCH_BANKS:
        raise ValueError(f"patch_bank={patch_bank!r} is not one of {list(PATCH_BANKS)}.")
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"map_images={num_images!r} must be an integer >= 1 (SPADE uses 50).")
    if isinstance(kappa, bool) or not isinstance(kappa, int) or kappa < 1:
        raise ValueError(f"map_kappa={kappa!r} must be an integer >= 1 (SPADE uses 1).")
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not 0 <= sigma < float("inf"):
        raise ValueError(f"map_sigma={sigma!r} must be a finite number >= 0 (SPADE uses 4; 0 = no smoothing).")


def gt_masks_of(batch: object) -> Tensor | None:
    """The segmentation masks ``[B, H, W]`` of a dict batch (key ``gt_mask`` or ``pixel_mask``; ``[B, C, H, W]``:
    non-zero in any channel = anomalous), else None."""
    if isinstance(batch, Mapping):
        for key in GT_MASK_KEYS:
            if key in batch:
                masks = batch[key]
                # [B, C, H, W]: a pixel is anomalous when any channel is non-zero, as masks read from files (a mask
                # drawn in green, (0, 255, 0), is not normal)
                return (masks != 0).any(1) if masks.ndim == 4 else masks
    return None


def gt_regions_of(batch: object) -> Tensor | None:
    """The ground-truth regions ``[B, H, W]`` of a dict batch (key ``gt_regions``: region ids within each sample,
    0 = normal, labelled before the masks were resized), else None."""
    if not isinstance(batch, Mapping) or GT_REGIONS_KEY not in batch:
        return None
    regions = batch[GT_REGIONS_KEY]
    if regions.ndim == 4:
        if regions.shape[1] != 1:
            raise ValueError(
                f"gt_regions {tuple(regions.shape)} must hold one channel of region ids per image ([B, H, W] or "
                "[B, 1, H, W])."
            )
        return regions[:, 0]
    return regions


class AnomalyMaps(nn.Module):
    """SPADE anomaly maps over a DN2 feature extractor.

    Args:
        backbone: the DN2 feature extractor (used here only to resolve the default stages).
        patch_bank: ``"nearest_images"`` (SPADE: the positions of the ``num_images`` nearest training images
            by global feature) or ``"all"`` (every training position).
        num_images: K, nearest training images per test image (SPADE: 50; capped at the bank size).
        kappa: nearest patch features averaged per position (SPADE: 1).
        sigma: Gaussian smoothing of the upsampled map, in image pixels (SPADE: 4).
        layers: trunk stages of the pyramid (``None`` = :func:`~dn2_lightning.maps.pyramid.pyramid_layers`).
        knn_backend, max_memory_bytes: for the patch search (the budget covers its temporaries).
        thresholds: thresholds of the binned pixel AUROC and PRO.
    """

    def __init__(
        self,
        backbone: FeatureExtractor,
        patch_bank: PatchBankName = "nearest_images",
        num_images: int = 50,
        kappa: int = 1,
        sigma: float = 4.0,
        layers: Sequence[str] | None = None,
        knn_backend: KNNBackend = "auto",
        max_memory_bytes: int | None = None,
        thresholds: int = DEFAULT_THRESHOLDS,
    ) -> None:
        super().__init__()
        validate_map_options(patch_bank, num_images, kappa, sigma)
        self.layers = pyramid_layers(backbone) if layers is None else check_layers(backbone, layers)
        self.patch_bank, self.num_images, self.kappa, self.sigma = patch_bank, num_images, kappa, float(sigma)
        self.knn_backend, self.max_memory_bytes = knn_backend, max_memory_bytes
        self.bank = PatchBank()
        self.thresholds = thresholds
        self.test_maps = MapCollector()
        self.test_results: PixelResults | None = None
        self._patches: list[Tensor] = []
        self._indices: list[Tensor] = []

    def embed(self, backbone: FeatureExtractor, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(embeddings [B, D], patches [B, C, h, w])`` of images ``[B, C, H, W]`` in one backbone pass."""
        if images.ndim != 4:
            raise ValueError(
                f"anomaly maps need single images [B, C, H, W], got {tuple(images.shape)}: group batches have no map."
            )
        return embed_with_patches(backbone, images, self.layers)

    # ------------------------------------------------------------------------------------- bank life cycle

    def start_collecting(self) -> None:
        self._patches, self._indices = [], []

    def collect(self, patches: Tensor, indices: Tensor) -> None:
        """Keep a training batch's patches ``[B, C, h, w]`` and dataset indices ``[B]``."""
        home = torch.device("cpu") if lacks_float64(patches.device) else patches.device  # as the image bank
        self._patches.append(patches.detach().to(home))
        self._indices.append(indices.detach().long().to(home))

    def finalize(self, keep_indices: Tensor, keep_collecting: bool = False) -> None:
        """Build the patch bank from the collected batches (gathered from every rank), keeping one row per
        dataset index in ``keep_indices`` (the image bank's rows, after cleaning); ``keep_collecting``: the
        batches stay for a later finalisation (validation inside the pass).

        Raises:
            MemoryError: the bank does not fit the device (checked before it is assembled).
        """
        if not self._patches:
            raise RuntimeError("no training patches were collected for the anomaly maps.")
        patches, indices = self._patches, self._indices
        if not keep_collecting:
            self._patches, self._indices = [], []
        _, c, h, w = patches[0].shape
        device = patches[0].device
        # every rank holds the whole gathered bank: count every rank's rows (a collective, as the gather below)
        rows = sum(count_rows(sum(len(i) for i in indices), device))
        # assembling copies the rows once; 'all' then needs their norms and the search's temporaries
        needed = rows * c * h * w * 4 + (rows * h * w * 4 + self._budget() if self.patch_bank == "all" else 0)
        # decided together: a rank refusing alone would leave the others waiting in the gather below
        refusal = None
        try:
            ensure_room(needed, device, f"the patch bank ({rows} images x {h}x{w} positions x {c} channels)")
        except MemoryError as error:
            refusal = str(error)
        refusals = [(r, text) for r, text in enumerate(gather_objects(refusal)) if text is not None]
        if refusals:
            where, text = refusals[0]
            raise MemoryError(text if world_size() == 1 else f"on rank {where}: {text}")
        indices, patches = gather_rows(torch.cat(indices)), gather_rows(torch.cat(patches))
        indices, patches = unique_by_index(indices, patches)
        keep = torch.isin(indices, keep_indices.to(indices.device))
        self.bank.set(patches[keep], indices[keep])

    # ------------------------------------------------------------------------------------------- scoring

    def maps_for(self, embeddings: Tensor, patches: Tensor, search: Search, image_size: Sequence[int]) -> Tensor:
        """Anomaly maps of a batch.

        Args:
            embeddings: ``[B, D]`` global embeddings (for the nearest training images).
            patches: ``[B, C, h, w]`` patch features from :meth:`embed`.
            search: ``search(embeddings, K) -> KNNResult`` over the image bank, neighbours as dataset
                indices (``DN2Module._search``).
            image_size: ``(H, W)`` of the output maps.

        Returns:
            ``[B, H, W]`` float32 maps: mean squared distance of each position to its ``kappa`` nearest
            training patch features, upsampled and smoothed.
        """
        if not self.bank.is_fitted:
            raise RuntimeError("the patch bank is empty: build the memory bank (fit) with anomaly_maps=True.")
        if lacks_float64(patches.device):  # computed where the patch bank is kept (the CPU), returned on the device
            return self.maps_for(embeddings.cpu(), patches.cpu(), search, image_size).to(patches.device)
        b, c, h, w = patches.shape
        if (h, w) != self.bank.grid or c != self.bank.patches.shape[-1]:
            raise ValueError(
                f"patch features [{c}, {h}, {w}] do not match the patch bank's [{self.bank.patches.shape[-1]}, "
                f"{self.bank.grid[0]}, {self.bank.grid[1]}]: the images must have the training images' size (the "
                "datamodules' load_size resizes every image to one; in a dataset of your own, transforms.Resize), "
                "and the model the bank's input_size and map_layers."
            )
        queries = patches.permute(0, 2, 3, 1).reshape(b, h * w, c).float() - self.bank.center
        if self.patch_bank == "all":
            scores = all_patch_scores(queries, self.bank.flat(), self.kappa, self.knn_backend, self._budget())
        else:
            k = min(self.num_images, len(self.bank))
            rows = self.bank.rows_of(search(embeddings, k).indices)
            scores = nearest_image_patch_scores(
                queries, self.bank.patches, rows, self.kappa, self.knn_backend, self._budget()
            )
        return to_image_maps(scores.view(b, h, w), tuple(image_size)[-2:], self.sigma)

    def _budget(self) -> int:
        return self.max_memory_bytes or DEFAULT_MAX_MEMORY_BYTES

    # ------------------------------------------------------------------------------------------- metrics

    def start_evaluation(self) -> None:
        """Forget the maps of an evaluation that stopped on an error (else they would join this one's metrics)."""
        self.test_maps.reset()
        self.test_results = None

    def update_metrics(
        self, indices: Tensor, maps: Tensor, masks: Tensor | None, regions: Tensor | None = None
    ) -> None:
        """Collect a test batch's maps ``[B, H, W]`` with its ground-truth masks (``None``: no masks, every
        pixel counts as normal) and, when the batch has them, its ground-truth regions (PRO's regions; else the
        masks' connected components)."""
        if masks is None:
            masks = torch.zeros_like(maps, dtype=torch.bool) if regions is None else regions != 0
        for name, truth in (("masks", masks), ("regions", regions)):
            if truth is not None and truth.shape != maps.shape:
                raise ValueError(
                    f"ground-truth {name} {tuple(truth.shape)} must have the maps' shape {tuple(maps.shape)}: load "
                    f"{name} at the images' size."
                )
        self.test_maps.update(indices, maps, masks, regions)

    def compute_metrics(self) -> dict[str, float]:
        """``{"pixel_auroc", "pro"}`` of the collected test maps (``{}`` when the masks have no anomalous
        pixel). The maps and masks are kept, on the CPU, in :attr:`test_results`."""
        results = self.test_maps.compute()
        # torchmetrics squeezes one-element results to 0-d: a single sample's index
        results = results._replace(indices=results.indices.reshape(-1))
        self.test_maps.reset()
        self.test_results = PixelResults(*(t.cpu() for t in results))
        # on the device (MPS: on the CPU)
        return pixel_metrics(results.maps, results.masks, self.thresholds, regions=results.regions)

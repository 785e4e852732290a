"""Anomaly maps (SPADE, Cohen & Hoshen 2020): where in the image the anomaly is.

``pyramid`` (multi-stage patch features) -> ``bank`` (training patch features) -> ``spade`` (exact patch
kNN, upsampling, smoothing) -> ``head`` (:class:`AnomalyMaps`, the life cycle used by ``DN2Module``) ->
``figures`` (heatmap overlays).
"""

from dn2_lightning.maps.bank import PatchBank
from dn2_lightning.maps.figures import map_overlay
from dn2_lightning.maps.head import AnomalyMaps, gt_masks_of, gt_regions_of, validate_map_options
from dn2_lightning.maps.pyramid import embed_with_patches, pyramid_layers
from dn2_lightning.maps.spade import (
    PATCH_BANKS,
    all_patch_scores,
    gaussian_blur,
    nearest_image_patch_scores,
    to_image_maps,
)

__all__ = [
    "PATCH_BANKS",
    "AnomalyMaps",
    "PatchBank",
    "all_patch_scores",
    "embed_with_patches",
    "gaussian_blur",
    "gt_masks_of",
    "gt_regions_of",
    "map_overlay",
    "nearest_image_patch_scores",
    "pyramid_layers",
    "to_image_maps",
    "validate_map_options",
]

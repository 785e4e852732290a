"""Datasets and DataModules for the unimodal, unsupervised (contaminated) and group settings.

Names are imported on first use (PEP 562), so tools that need only the datasets (``dn2-protocol``) do not
pay for importing Lightning.
"""

from __future__ import annotations

from dn2_lightning._lazy import lazy_exports

_EXPORTS = {
    "AnomalyLabel": "classes",
    "ArrayImageDataset": "datasets",
    "ImageFolderDataset": "datasets",
    "Renumbered": "datasets",
    "list_image_files": "datasets",
    "GroupDataModule": "group",
    "GroupDataset": "group",
    "ImageTooLargeError": "images",
    "UnreadableImageError": "images",
    "load_image": "images",
    "OneClassDataModule": "one_class",
    "DatasetNotFoundError": "sources",
    "LabeledImages": "sources",
    "list_datasets": "sources",
    "load_split": "sources",
}
__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Datasets and DataModules for the unimodal, unsupervised (contaminated) and group settings.

Names are imported on first use (PEP 562), so tools that need only the datasets (``dn2-protocol``) do not
pay for importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ArrayImageDataset": "datasets",
    "ImageFolderDataset": "datasets",
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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__

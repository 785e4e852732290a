"""Datasets and DataModules for the unimodal, unsupervised (contaminated) and group settings."""

from dn2_lightning.data.datasets import ArrayImageDataset, ImageFolderDataset, list_image_files
from dn2_lightning.data.group import GroupDataModule, GroupDataset
from dn2_lightning.data.images import ImageTooLargeError, UnreadableImageError, load_image
from dn2_lightning.data.one_class import OneClassDataModule
from dn2_lightning.data.sources import DatasetNotFoundError, LabeledImages, list_datasets, load_split

__all__ = [
    "ArrayImageDataset",
    "DatasetNotFoundError",
    "GroupDataModule",
    "GroupDataset",
    "ImageTooLargeError",
    "ImageFolderDataset",
    "LabeledImages",
    "OneClassDataModule",
    "UnreadableImageError",
    "list_datasets",
    "list_image_files",
    "load_image",
    "load_split",
]

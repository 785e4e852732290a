"""DN2: Deep Nearest Neighbor Anomaly Detection (Bergman, Cohen & Hoshen, 2020) for PyTorch Lightning.

The data path, one module per stage: ``data`` (datasets, DataModules) -> ``backbones`` (F) -> ``bank``
(training embeddings) -> ``knn`` (exact search) -> ``scoring`` (DN2 score, cleaning, group pooling) ->
``metrics`` (per-sample scores, AUROC) -> ``module`` (the LightningModule) -> ``cli`` (``dn2``).
"""

import logging as _logging

from dn2_lightning.backbones import BackboneSpec, FeatureExtractor, build_backbone, list_backbones, register_backbone
from dn2_lightning.bank import MemoryBank
from dn2_lightning.data import GroupDataModule, OneClassDataModule, list_datasets
from dn2_lightning.detector import DN2Detector
from dn2_lightning.knn import KNNResult, knn_distances, list_knn_backends
from dn2_lightning.metrics import AnomalyScores, ImageScores
from dn2_lightning.module import DN2Module

__all__ = [
    "AnomalyScores",
    "BackboneSpec",
    "DN2Detector",
    "DN2Module",
    "ImageScores",
    "FeatureExtractor",
    "GroupDataModule",
    "KNNResult",
    "MemoryBank",
    "OneClassDataModule",
    "build_backbone",
    "knn_distances",
    "list_backbones",
    "list_datasets",
    "list_knn_backends",
    "register_backbone",
]
__version__ = "0.1.0"

# as Lightning does for its own logger: print INFO messages unless the application configured logging
_logging.getLogger(__name__).setLevel(_logging.INFO)
if not _logging.getLogger().hasHandlers():
    _logging.getLogger(__name__).addHandler(_logging.StreamHandler())
    _logging.getLogger(__name__).propagate = False

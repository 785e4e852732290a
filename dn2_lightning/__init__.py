"""DN2: Deep Nearest Neighbor Anomaly Detection (Bergman, Cohen & Hoshen, 2020) for PyTorch Lightning.

The data path, one module per stage: ``data`` (datasets, DataModules) -> ``backbones`` (F) -> ``bank``
(training embeddings) -> ``knn`` (exact search) -> ``scoring`` (DN2 score, cleaning, threshold) ->
``group_pooling`` / ``maps`` (group descriptors, pixel maps) -> ``metrics`` (per-sample scores, AUROC) ->
``module`` (the LightningModule) -> ``reports`` -> ``cli`` (``dn2``).

Names are imported on first use (PEP 562): ``import dn2_lightning`` is cheap, and tools that need no
Lightning (``dn2-protocol``, ``knn_distances``, ``DN2Detector``) never import it.
"""

from __future__ import annotations

import logging as _logging

from dn2_lightning._lazy import lazy_exports

_EXPORTS = {
    "AnomalyScores": "metrics",
    "ImageScores": "metrics",
    "BackboneSpec": "backbones",
    "FeatureExtractor": "backbones",
    "build_backbone": "backbones",
    "list_backbones": "backbones",
    "register_backbone": "backbones",
    "DN2Detector": "detector",
    "DN2Module": "module",
    "GroupDataModule": "data",
    "OneClassDataModule": "data",
    "list_datasets": "data",
    "KNNResult": "knn",
    "knn_distances": "knn",
    "list_knn_backends": "knn",
    "MemoryBank": "bank",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"

# as Lightning does for its own logger: print INFO messages, but keep whatever the application configured
# before importing us (a level set on this logger, handlers on it or on the root logger)
_logger = _logging.getLogger(__name__)
if _logger.level == _logging.NOTSET:
    _logger.setLevel(_logging.INFO)
if not _logger.handlers and not _logging.getLogger().hasHandlers():
    _logger.addHandler(_logging.StreamHandler())
    _logger.propagate = False

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

"""Segmentation application: models, loss, metrics and datasets.

Builds on :mod:`patchdp_opacus.plugin` (Opacus compatibility); nothing in the
lower layers imports from here.
"""

from .datasets import DATASETS, SegmentationDataset, build_dataset
from .losses import PerImageCrossEntropy, per_image_cross_entropy
from .metrics import ConfusionMatrix, confusion_matrix, mean_iou, per_class_iou, pixel_accuracy
from .models import ARCHITECTURES, PaddedSegmentationModel, build_model, register_architecture

__all__ = [
    "ARCHITECTURES",
    "ConfusionMatrix",
    "DATASETS",
    "PaddedSegmentationModel",
    "PerImageCrossEntropy",
    "SegmentationDataset",
    "build_dataset",
    "build_model",
    "confusion_matrix",
    "mean_iou",
    "per_class_iou",
    "per_image_cross_entropy",
    "pixel_accuracy",
    "register_architecture",
]

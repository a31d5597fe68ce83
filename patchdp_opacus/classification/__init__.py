"""Classification application (the paper's appendix C.8): DTD and MNIST datasets, torchvision
ResNet-18 / VGG-11 made ready for Opacus, and accuracy metrics.

Builds on :mod:`patchdp_opacus.plugin` (Opacus compatibility) and reuses the confusion-matrix
code of :mod:`patchdp_opacus.segmentation.metrics`.
"""

from .datasets import DTD, MNIST, ClassificationDataset, preprocess_dtd
from .metrics import (
    ClassificationMetrics,
    confusion_matrix,
    mean_per_class_accuracy,
    per_class_accuracy,
    top1_accuracy,
)
from .models import ClassificationModel, build_classifier, remove_batchnorm

__all__ = [
    "DTD", "MNIST", "ClassificationDataset", "ClassificationMetrics", "ClassificationModel",
    "build_classifier", "confusion_matrix", "mean_per_class_accuracy", "per_class_accuracy",
    "preprocess_dtd", "remove_batchnorm", "top1_accuracy",
]

"""Classification metrics from a confusion matrix (torch).

Convention (as in :mod:`patchdp_opacus.segmentation.metrics`, whose confusion-matrix code is
reused here): ``cm[t, p]`` counts samples of true class ``t`` predicted as ``p``.

* top-1 accuracy = trace(cm) / cm.sum()  (the fraction of samples whose arg-max logit is the
  label);
* per-class accuracy_c = cm[c, c] / cm[c, :].sum()  (recall of class ``c``); NaN for a class
  with no sample, and :func:`mean_per_class_accuracy` averages over the classes present.
"""

from __future__ import annotations

import math

import torch

from patchdp_opacus.segmentation.metrics import ConfusionMatrix
from patchdp_opacus.segmentation.metrics import confusion_matrix as _confusion_matrix
from patchdp_opacus.segmentation.metrics import pixel_accuracy as _trace_fraction

__all__ = ["ClassificationMetrics", "confusion_matrix", "mean_per_class_accuracy",
           "per_class_accuracy", "top1_accuracy"]

#: No label is ignored in classification (labels are ids in [0, num_classes)).
_NO_IGNORE = -1


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 matrix, rows = true class.

    Args:
        pred: predicted ids ``(B,)`` or logits ``(B, num_classes)`` (arg-max taken).
        target: true ids ``(B,)``.

    Raises:
        ValueError: shapes differ or an id lies outside ``[0, num_classes)``.
    """
    return _confusion_matrix(pred, target, num_classes, ignore_index=_NO_IGNORE)


def top1_accuracy(cm: torch.Tensor) -> float:
    """Fraction of samples classified correctly; NaN for an empty matrix."""
    return _trace_fraction(cm)


def per_class_accuracy(cm: torch.Tensor) -> torch.Tensor:
    """Accuracy (recall) of every class, float64 ``(num_classes,)``; NaN for absent classes."""
    cm = cm.double()
    support = cm.sum(dim=1)
    acc = torch.full_like(support, math.nan)
    present = support > 0
    acc[present] = cm.diagonal()[present] / support[present]
    return acc


def mean_per_class_accuracy(cm: torch.Tensor) -> float:
    """Mean of :func:`per_class_accuracy` over the classes present; NaN if none."""
    acc = per_class_accuracy(cm)
    valid = ~torch.isnan(acc)
    return acc[valid].mean().item() if valid.any() else math.nan


class ClassificationMetrics(ConfusionMatrix):
    """Accumulates a confusion matrix over batches.

    Example::

        metrics = ClassificationMetrics(47)
        for images, labels in loader:
            metrics.update(model(images), labels)
        metrics.compute()  # {'accuracy': ..., 'mean_per_class_accuracy': ..., ...}
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, ignore_index=_NO_IGNORE)

    def compute(self, with_confusion_matrix: bool = False) -> dict[str, object]:
        """``{"accuracy", "mean_per_class_accuracy", "per_class_accuracy", "samples"}`` and,
        on request, ``"confusion_matrix"`` (nested lists, rows = true class)."""
        cm = self.value()
        out: dict[str, object] = {
            "accuracy": top1_accuracy(cm),
            "mean_per_class_accuracy": mean_per_class_accuracy(cm),
            "per_class_accuracy": per_class_accuracy(cm).tolist(),
            "samples": int(cm.sum().item()),
        }
        if with_confusion_matrix:
            out["confusion_matrix"] = cm.tolist()
        return out

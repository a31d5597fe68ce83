"""Segmentation metrics from a confusion matrix (torch).

Convention: ``cm[t, p]`` counts pixels whose ground truth is class ``t`` and
prediction is class ``p``; pixels labelled ``ignore_index`` (255) are skipped.

* pixel accuracy = trace(cm) / cm.sum()  (over non-ignored pixels);
* IoU_c = cm[c, c] / (row_c + col_c - cm[c, c]);
* mIoU = mean of IoU_c over the classes that occur in the ground truth *or* in
  the prediction. A class absent from both has an undefined IoU (0/0): it is
  reported as NaN by :func:`per_class_iou` and excluded from :func:`mean_iou`.
  A class predicted but absent from the ground truth counts with IoU 0.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "ConfusionMatrix",
    "confusion_matrix",
    "mean_iou",
    "per_class_iou",
    "pixel_accuracy",
]

IGNORE_INDEX = 255


def confusion_matrix(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Confusion matrix (num_classes, num_classes), int64, rows = ground truth.

    Args:
        pred: predicted class ids (B, H, W) or logits (B, C, H, W) (argmax over C).
        target: ground-truth ids (B, H, W); ``ignore_index`` pixels are skipped.
        num_classes: number of classes.
        ignore_index: label value to skip.

    Raises:
        ValueError: shapes differ, or a target/prediction id outside
            [0, num_classes) that is not ``ignore_index``.
    """
    if pred.dim() == target.dim() + 1:
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel():
        if int(target.min()) < 0 or int(target.max()) >= num_classes:
            raise ValueError(f"target ids must lie in [0, {num_classes}) or be {ignore_index}")
        if int(pred.min()) < 0 or int(pred.max()) >= num_classes:
            raise ValueError(f"predicted ids must lie in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Overall pixel accuracy (fraction of non-ignored pixels correct); NaN if empty."""
    total = cm.sum().item()
    return cm.diagonal().sum().item() / total if total else math.nan


def per_class_iou(cm: torch.Tensor) -> torch.Tensor:
    """IoU per class, float64 (num_classes,); NaN where the class is absent from
    both ground truth and prediction."""
    cm = cm.double()
    inter = cm.diagonal()
    union = cm.sum(dim=0) + cm.sum(dim=1) - inter
    iou = torch.full_like(inter, math.nan)
    present = union > 0
    iou[present] = inter[present] / union[present]
    return iou


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over classes present in ground truth or prediction; NaN if none."""
    iou = per_class_iou(cm)
    valid = ~torch.isnan(iou)
    return iou[valid].mean().item() if valid.any() else math.nan


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches (on the device of the inputs).

    Example::

        cm = ConfusionMatrix(19)
        for images, masks in loader:
            cm.update(model(images), masks)
        print(cm.compute())  # {'pixel_accuracy': ..., 'miou': ..., 'iou': [...]}
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget all accumulated counts."""
        self.matrix = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` ids (B, H, W) or logits (B, C, H, W); ``target`` (B, H, W)."""
        cm = confusion_matrix(pred.detach(), target.to(pred.device), self.num_classes, self.ignore_index)
        self.matrix = cm if self.matrix is None else self.matrix + cm.to(self.matrix.device)

    def value(self) -> torch.Tensor:
        """The accumulated matrix (zeros if nothing was added)."""
        if self.matrix is None:
            return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        return self.matrix

    def compute(self) -> dict[str, object]:
        """``{"pixel_accuracy": float, "miou": float, "iou": list[float]}`` (NaN = class absent)."""
        cm = self.value()
        return {
            "pixel_accuracy": pixel_accuracy(cm),
            "miou": mean_iou(cm),
            "iou": per_class_iou(cm).tolist(),
        }

"""Classification's part of ``patchdp train``: the model, the evaluation on whole images (top-1
accuracy, per-class accuracy, the confusion matrix) and what a run reports.

Evaluation sees whole images, as the paper's code does (its validation and test transforms
resize DTD to 300x300 and keep MNIST's 28x28, without a crop): the model is trained on random
crops and tested on the full image, which a classifier with global pooling accepts.  With a
loader-owned ``resize`` the same deterministic resize (size and kernel) is applied first, by
the training loop (:func:`patchdp_opacus.app.loop.evaluation_dataset`).

The training loop is shared with segmentation: :func:`patchdp_opacus.app.loop.train`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset

from patchdp_opacus.classification.metrics import ClassificationMetrics
from patchdp_opacus.classification.models import build_classifier


def build_classification_model(cfg, input_size):
    """``(model, CompatReport)`` of ``cfg.model``, checked at ``input_size`` (the crop, or the
    whole image without one)."""
    m = cfg.model
    return build_classifier(m.arch, m.num_classes, weights=m.weights, norm=m.norm,
                            in_channels=m.in_channels, small_input=m.small_input,
                            normalize=m.normalize, check_input_size=tuple(input_size),
                            return_report=True)


def _sizes(dataset) -> set:
    sizes = getattr(dataset, "image_sizes", None)
    return set(sizes) if sizes is not None else set()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, num_classes: int, device: torch.device, *,
             batch_size: int = 64, max_images: Optional[int] = None,
             confusion_matrix: bool = False) -> dict:
    """Top-1 accuracy, mean and per-class accuracy (recall) on whole images of ``dataset``
    (one image per batch when its images differ in size), the majority-class baseline and,
    on request, the confusion matrix (rows = true class)."""
    was_training = model.training
    model.eval()
    metrics = ClassificationMetrics(num_classes)
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    batch = batch_size if len(_sizes(dataset)) <= 1 else 1
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for images, labels in DataLoader(Subset(dataset, range(n)), batch_size=batch):
        labels = torch.as_tensor(labels)
        metrics.update(model(images.to(device)).argmax(1), labels.to(device))
        counts += torch.bincount(labels, minlength=num_classes)
    model.train(was_training)
    out = metrics.compute(with_confusion_matrix=confusion_matrix)
    out["num_images"] = n
    out["majority_class_accuracy"] = counts.max().item() / n if n else float("nan")
    return out

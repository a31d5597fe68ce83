"""Segmentation's part of ``patchdp train``: the model, the full-resolution evaluation (mIoU,
pixel accuracy, per-class IoU) and what a run reports.

The training loop itself is shared with classification: :func:`patchdp_opacus.app.loop.train`
(re-exported here with the names existing code imports).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from patchdp_opacus.app.loop import (  # noqa: F401 - the shared loop, re-exported
    CHECKPOINT,
    Progress,
    build_datasets,
    init_distributed,
    loader_arguments,
    resolve_device,
    train,
)
from patchdp_opacus.app.outputs import FINAL_JSON, LOSS_COLUMN  # noqa: F401
from patchdp_opacus.segmentation.metrics import ConfusionMatrix
from patchdp_opacus.segmentation.models import build_model


def build_segmentation_model(cfg):
    """``(model, CompatReport)`` of ``cfg.model`` for inputs of ``privacy.crop``; an unknown
    ``model.extra`` argument raises a ``ConfigError`` naming it."""
    from patchdp_opacus.app.config import ConfigError

    m = cfg.model
    try:
        return build_model(m.arch, encoder_name=m.encoder_name,
                           encoder_weights=m.encoder_weights, num_classes=m.num_classes,
                           output_stride=m.output_stride, norm=m.norm,
                           aspp_rates=tuple(m.aspp_rates), return_report=True,
                           check_input_size=None if cfg.privacy.crop is None
                           else tuple(cfg.privacy.crop), **m.extra)
    except TypeError as exc:  # an unknown model.extra argument
        if not m.extra:
            raise
        raise ConfigError("model.extra", str(exc)) from None


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, num_classes: int, device: torch.device, *,
             batch_size: int = 1, max_images: Optional[int] = None,
             progress: Optional[Callable] = None, confusion_matrix: bool = False) -> dict:
    """Pixel accuracy, per-class IoU and mIoU on full-resolution images of ``dataset`` (and, on
    request, the pixel confusion matrix, rows = true class)."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index=getattr(dataset, "ignore_index", 255))
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    loader = DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    for images, masks in (progress(loader) if progress else loader):
        logits = model(images.to(device))
        cm.update(logits.argmax(1), masks.to(device))
    model.train(was_training)
    out = cm.compute()
    out["num_images"] = n
    if confusion_matrix:
        out["confusion_matrix"] = cm.value().tolist()
    # Baseline the demo must beat: predict the most frequent ground-truth class everywhere.
    mat = cm.value().double()
    totals = mat.sum(1)
    present = int((totals > 0).sum())
    out["majority_class_miou"] = float(totals.max() / totals.sum() / max(present, 1)) \
        if totals.sum() > 0 else float("nan")
    return out

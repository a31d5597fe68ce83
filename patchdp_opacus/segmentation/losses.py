"""Per-image segmentation loss whose per-sample values never mix samples.

DP-SGD clips per-sample gradients, so each sample's loss must depend on that
sample only. Averaging the cross-entropy over all valid pixels of a batch
(``nn.CrossEntropyLoss(ignore_index=255)``) couples samples through the
denominator; :class:`PerImageCrossEntropy` first averages over each image's own
valid pixels, then reduces over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IGNORE_INDEX", "PerImageCrossEntropy", "per_image_cross_entropy"]

IGNORE_INDEX = 255
_REDUCTIONS = ("none", "mean", "sum")


def per_image_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over each image's valid pixels, shape (B,).

    Args:
        logits: (B, C, H, W) unnormalised scores.
        target: (B, H, W) integer class ids in [0, C) or ``ignore_index``.
        ignore_index: label value excluded from the loss (and the count).
        weight: optional (C,) class weights; the per-image mean is then the
            weighted mean ``sum(w_y * ce) / sum(w_y)`` over the image's valid pixels.

    Returns:
        (B,) tensor; an image without valid pixels gets 0 (not NaN) and no
        gradient.
    """
    if logits.dim() < 2 or target.dim() != logits.dim() - 1:
        raise ValueError(f"expected logits (B, C, ...) and target (B, ...), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    target = target.long()
    pixel_loss = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="none")
    batch = pixel_loss.shape[0]
    valid = target != ignore_index
    if weight is None:
        denom = valid.reshape(batch, -1).sum(dim=1).to(pixel_loss.dtype)
    else:
        safe = torch.where(valid, target, torch.zeros_like(target))
        denom = (weight[safe] * valid).reshape(batch, -1).sum(dim=1).to(pixel_loss.dtype)
    total = pixel_loss.reshape(batch, -1).sum(dim=1)
    return total / denom.clamp_min(torch.finfo(pixel_loss.dtype).tiny) * (denom > 0)


class PerImageCrossEntropy(nn.Module):
    """Cross-entropy averaged over each image's valid pixels, then over the batch.

    ``reduction`` may be changed after construction (Opacus' ghost clipping
    wrapper ``DPLossFastGradientClipping`` sets it to ``"none"`` temporarily):

    * ``"none"``: per-image losses, shape (B,);
    * ``"mean"``: mean of the per-image losses (scalar);
    * ``"sum"``: sum of the per-image losses (scalar).

    Pixels labelled ``ignore_index`` (255) are excluded; an image with no valid
    pixel contributes 0. Sample i's loss depends on sample i only.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, reduction: str = "mean", weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        if weight is not None:
            self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))
        else:
            self.weight = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {self.reduction!r}")
        weight = None if self.weight is None else self.weight.to(logits.dtype)
        per_image = per_image_cross_entropy(logits, target, self.ignore_index, weight)
        if self.reduction == "none":
            return per_image
        if self.reduction == "sum":
            return per_image.sum()
        return per_image.mean()

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"

"""Segmentation models (segmentation-models-pytorch 0.6) made ready for Opacus.

:func:`build_model` builds an smp architecture from the :data:`ARCHITECTURES`
registry, wraps it in :class:`PaddedSegmentationModel` (any input size works:
zero padding on the right/bottom up to the model's divisor, logits cropped
back) and applies :func:`patchdp_opacus.plugin.compat.make_private_compatible`.

Input convention of the returned model: images ``(B, 3, H, W)`` in *pixel
units* (0–255), either ``torch.uint8`` or float. With ``normalize=True`` (the
default) the model subtracts the ImageNet mean and divides by the ImageNet std
(both in pixel units) itself, so the data pipeline hands over raw crops. Output:
logits ``(B, num_classes, H, W)``.

Padding and cropping are deterministic post-processing of the random crop, so
they do not change the patch-level privacy analysis.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from patchdp_opacus.plugin.compat import CompatReport, make_private_compatible

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PaddedSegmentationModel",
    "build_model",
    "register_architecture",
    "required_divisor",
]

#: ImageNet channel statistics in pixel units (0–255), RGB order.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

ArchBuilder = Callable[..., nn.Module]

#: name -> builder(encoder_name, encoder_weights, num_classes, output_stride, **kwargs) -> smp model.
ARCHITECTURES: dict[str, ArchBuilder] = {}


def register_architecture(name: str) -> Callable[[ArchBuilder], ArchBuilder]:
    """Decorator registering an architecture builder under ``name``.

    A builder is called as ``builder(encoder_name=..., encoder_weights=...,
    num_classes=..., output_stride=..., **kwargs)`` and returns an un-wrapped
    model whose ``forward`` maps ``(B, 3, H, W)`` to logits ``(B, C, H, W)``
    for ``H, W`` divisible by :func:`required_divisor`.
    """

    def deco(fn: ArchBuilder) -> ArchBuilder:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = fn
        return fn

    return deco


@register_architecture("deeplabv3plus")
def _deeplabv3plus(
    *,
    encoder_name: str,
    encoder_weights: str | None,
    num_classes: int,
    output_stride: int,
    aspp_rates: Sequence[int] = (12, 24, 36),
    **kwargs: Any,
) -> nn.Module:
    """DeepLabV3+ (smp) with a dilated encoder at output stride 8 or 16."""
    import segmentation_models_pytorch as smp

    if output_stride not in (8, 16):
        raise ValueError(f"deeplabv3plus supports output_stride 8 or 16, got {output_stride}")
    return smp.DeepLabV3Plus(
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        encoder_output_stride=output_stride,
        decoder_atrous_rates=tuple(aspp_rates),
        classes=num_classes,
        **kwargs,
    )


@register_architecture("pspnet")
def _pspnet(
    *,
    encoder_name: str,
    encoder_weights: str | None,
    num_classes: int,
    output_stride: int,
    aspp_rates: Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Dilated PSPNet (smp): encoder depth 5, encoder dilated to ``output_stride``.

    smp's default ``encoder_depth=3`` leaves layer3/layer4 in the encoder
    without gradients (Opacus rejects that), so depth 5 is used; smp's
    ``get_encoder(output_stride=...)`` dilates the encoder, and the head's
    upsampling factor is set to the output stride so logits match the input.
    ``aspp_rates`` is accepted and ignored (PSPNet has no ASPP).
    """
    import segmentation_models_pytorch as smp

    if output_stride not in (8, 16, 32):
        raise ValueError(f"pspnet supports output_stride 8, 16 or 32, got {output_stride}")
    kwargs.setdefault("encoder_depth", 5)
    if kwargs["encoder_depth"] != 5:
        raise ValueError("pspnet is built with encoder_depth=5 (shallower encoders leave layers without gradients)")
    extra = {} if output_stride == 32 else {"output_stride": output_stride}
    return smp.PSPNet(
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        classes=num_classes,
        upsampling=output_stride,
        **extra,
        **kwargs,
    )


def required_divisor(model: nn.Module) -> int:
    """Input height/width divisor an smp model requires (pixels).

    smp's ``SegmentationModel.check_input_shape`` demands divisibility by
    ``model.encoder.output_stride`` (= min(encoder output stride, 2**depth)).
    Models without that attribute report 1.
    """
    if getattr(model, "requires_divisible_input_shape", True) is False:
        return 1
    encoder = getattr(model, "encoder", None)
    return int(getattr(encoder, "output_stride", 1) or 1)


class PaddedSegmentationModel(nn.Module):
    """Wrap a segmentation net so that any input size (H, W) works.

    ``forward(x)``: ``x`` is ``(B, 3, H, W)`` in pixel units (uint8 or float);
    it is converted to float, optionally normalised with ``pixel_mean`` /
    ``pixel_std`` (pixel units), zero-padded on the bottom and right to the
    next multiple of ``divisor`` (zero = the mean colour after normalisation),
    passed through ``net`` and the logits are cropped back to ``(H, W)``.
    Each sample is processed independently (no cross-sample operation).

    Attributes:
        net: the wrapped model (its state_dict keys are prefixed ``net.``).
        divisor: padded height and width are multiples of this (pixels).
    """

    def __init__(
        self,
        net: nn.Module,
        divisor: int,
        pixel_mean: Sequence[float] | None = IMAGENET_MEAN,
        pixel_std: Sequence[float] | None = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if divisor < 1:
            raise ValueError(f"divisor must be >= 1, got {divisor}")
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError("give both pixel_mean and pixel_std, or neither")
        self.net = net
        self.divisor = int(divisor)
        if pixel_mean is not None:
            self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(1, -1, 1, 1))
        else:
            self.pixel_mean = None
            self.pixel_std = None

    def padded_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) after padding an input of ``size`` = (height, width)."""
        d = self.divisor
        return (-(-size[0] // d) * d, -(-size[1] // d) * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected input (B, C, H, W), got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            x = x.float()
        if self.pixel_mean is not None:
            x = (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        h, w = x.shape[-2:]
        ph, pw = self.padded_size((h, w))
        if (ph, pw) != (h, w):
            x = F.pad(x, (0, pw - w, 0, ph - h), mode="constant", value=0.0)
        logits = self.net(x)
        if logits.shape[-2:] != (ph, pw):
            raise RuntimeError(
                f"model returned logits of size {tuple(logits.shape[-2:])} for a padded input of "
                f"{(ph, pw)}; the divisor {self.divisor} does not match the architecture"
            )
        return logits[..., :h, :w]


def build_model(
    arch: str = "deeplabv3plus",
    encoder_name: str = "resnet101",
    encoder_weights: str | None = None,
    num_classes: int = 19,
    output_stride: int = 8,
    norm: str = "group",
    aspp_rates: Sequence[int] = (12, 24, 36),
    *,
    normalize: bool = True,
    pad_divisor: int | None = None,
    check_input_size: tuple[int, int] | None = None,
    return_report: bool = False,
    **kwargs: Any,
) -> PaddedSegmentationModel | tuple[PaddedSegmentationModel, CompatReport]:
    """Build an Opacus-compatible segmentation model.

    Args:
        arch: a key of :data:`ARCHITECTURES` ("deeplabv3plus", "pspnet").
        encoder_name: smp encoder name, e.g. "resnet101" (paper), "resnet18".
        encoder_weights: None (random init) or e.g. "imagenet" (smp downloads
            the weights from its model hub on first use; needs network).
        num_classes: number of output channels (19 for Cityscapes trainIds).
        output_stride: encoder output stride (8 = paper's dilated setting).
        norm: "group" (BatchNorm → GroupNorm, fresh affine params) or
            "frozen" (BatchNorm kept, frozen, always in eval mode). With
            ``encoder_weights=None`` frozen BatchNorms are identity maps.
        aspp_rates: ASPP atrous rates (DeepLabV3+ only; paper: 12, 24, 36).
        normalize: normalise inputs with the ImageNet mean/std in pixel units
            inside the model (inputs are then raw 0–255 pixels).
        pad_divisor: override the padding divisor (pixels); default is smp's
            requirement, :func:`required_divisor`.
        check_input_size: optional (height, width); if given, one trial
            forward/backward at that size (batch 1) freezes parameters without
            gradient and checks the model under full backward hooks.
        return_report: also return the :class:`CompatReport`.
        **kwargs: passed to the architecture builder / smp constructor.

    Returns:
        The wrapped model (train mode), or ``(model, report)``.
    """
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; registered: {sorted(ARCHITECTURES)}")
    net = ARCHITECTURES[arch](
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        num_classes=num_classes,
        output_stride=output_stride,
        aspp_rates=aspp_rates,
        **kwargs,
    )
    divisor = pad_divisor if pad_divisor is not None else required_divisor(net)
    model = PaddedSegmentationModel(
        net,
        divisor,
        pixel_mean=IMAGENET_MEAN if normalize else None,
        pixel_std=IMAGENET_STD if normalize else None,
    )
    if norm == "frozen" and encoder_weights is None:
        logger.warning(
            "norm='frozen' with encoder_weights=None: frozen BatchNorm layers keep their initial "
            "statistics (mean 0, var 1) and act as identity maps"
        )
    example = None
    if check_input_size is not None:
        example = torch.zeros(1, 3, *check_input_size)
    model, report = make_private_compatible(model, norm=norm, example_input=example)
    model.train()
    logger.info(
        "built %s/%s (output stride %d, %d classes, pad divisor %d, norm=%s)",
        arch, encoder_name, output_stride, num_classes, divisor, norm,
    )
    return (model, report) if return_report else model

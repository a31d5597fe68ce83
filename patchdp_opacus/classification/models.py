"""Classification models (torchvision ResNet-18, VGG-11) made ready for Opacus.

:func:`build_classifier` builds a torchvision architecture — with ImageNet weights through
torchvision's own weight API (``torchvision.models.get_model(name, weights=...)``, which
downloads on first use) or randomly initialised — replaces its head, applies the BatchNorm
policy and runs :func:`patchdp_opacus.plugin.compat.make_private_compatible`.

BatchNorm policies (``norm``):

* ``"frozen"`` — the paper's DTD setting: pretrained BatchNorm kept, frozen for real (eval mode
  forever, no gradients, statistics never update);
* ``"none"`` — the paper's MNIST setting: every BatchNorm *removed* (replaced by identity);
  torchvision's ``vgg11`` has none to begin with;
* ``"group"`` — BatchNorm replaced by ``GroupNorm(gcd(32, C), C)`` (not used by the paper).

VGG-11: the paper freezes "the batch normalization layers" of both models on DTD, which implies
torchvision's ``vgg11_bn``; plain ``vgg11`` (no BatchNorm) is offered too.

Small inputs (``small_input=True``, for MNIST's 10x10 crops): ResNet-18's stem becomes a 3x3
stride-1 convolution without max-pool (overall stride 8 instead of 32: a 10x10 crop keeps a 2x2
map in ``layer4`` instead of 1x1 from ``layer3`` on), and VGG-11 keeps only its first three
max-pools (stride 8; the five stride-2 pools of the default model cannot take a 10x10 input)
and pools its 512 channels globally into a 512-4096-4096-classes classifier (the default
classifier would replicate a 1x1 map to 7x7 and feed 25088 inputs to its first layer).

Input convention: ``(B, C, H, W)`` in pixel units 0-255 (``uint8`` or float); the model
normalises with ``pixel_mean`` / ``pixel_std`` (pixel units) itself. Output: logits
``(B, num_classes)``. Every sample is processed independently.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from patchdp_opacus.plugin.compat import CompatReport, make_private_compatible

logger = logging.getLogger(__name__)

__all__ = ["ARCHITECTURES", "NORMALIZATIONS", "NORMS", "ClassificationModel",
           "build_classifier", "remove_batchnorm"]

ARCHITECTURES = ("resnet18", "vgg11", "vgg11_bn")
NORMS = ("frozen", "none", "group")
#: Channel statistics in pixel units (0-255): ImageNet (RGB) as torchvision documents them for
#: its weights; MNIST (grey) over its 60000 training images.
NORMALIZATIONS = {
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "mnist": ((0.1307 * 255,), (0.3081 * 255,)),
}
#: ``weights="imagenet"`` means this torchvision weight entry.
IMAGENET_WEIGHTS = "IMAGENET1K_V1"


class ClassificationModel(nn.Module):
    """``net`` behind a per-channel normalisation in pixel units.

    ``forward(x)``: ``x`` ``(B, C, H, W)``, uint8 or float, pixel units 0-255 -> logits
    ``(B, num_classes)``. ``pixel_mean`` / ``pixel_std`` of length ``C`` (or None: no
    normalisation) are buffers, so checkpoints carry them.
    """

    def __init__(self, net: nn.Module, pixel_mean: Optional[Sequence[float]] = None,
                 pixel_std: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if (pixel_mean is None) != (pixel_std is None):
            raise ValueError("give both pixel_mean and pixel_std, or neither")
        self.net = net
        if pixel_mean is not None:
            self.register_buffer("pixel_mean", torch.tensor(pixel_mean).float().view(1, -1, 1, 1))
            self.register_buffer("pixel_std", torch.tensor(pixel_std).float().view(1, -1, 1, 1))
        else:
            self.pixel_mean = self.pixel_std = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected input (B, C, H, W), got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            x = x.float()
        if self.pixel_mean is not None:
            if x.shape[1] != self.pixel_mean.shape[1]:
                raise ValueError(f"input has {x.shape[1]} channels, the model normalises "
                                 f"{self.pixel_mean.shape[1]}")
            x = (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        return self.net(x)


def remove_batchnorm(model: nn.Module) -> list[str]:
    """Replace every BatchNorm of ``model`` by ``nn.Identity`` in place; returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and n]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, nn.Identity())
    return names


def _resolve_weights(weights: Optional[str]) -> Optional[str]:
    if weights is None:
        return None
    return IMAGENET_WEIGHTS if str(weights).lower() == "imagenet" else str(weights)


def _torchvision_net(arch: str, weights: Optional[str]) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights=_resolve_weights(weights))


def _fresh_conv(old: nn.Conv2d, in_channels: int, **overrides) -> nn.Conv2d:
    kw = dict(kernel_size=old.kernel_size, stride=old.stride, padding=old.padding,
              bias=old.bias is not None)
    kw.update(overrides)
    return nn.Conv2d(in_channels, old.out_channels, **kw)


def _adapt_resnet(net: nn.Module, num_classes: int, in_channels: int, small_input: bool):
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    if small_input:
        net.conv1 = _fresh_conv(net.conv1, in_channels, kernel_size=3, stride=1, padding=1)
        net.maxpool = nn.Identity()
    elif in_channels != net.conv1.in_channels:
        net.conv1 = _fresh_conv(net.conv1, in_channels)


def _adapt_vgg(net: nn.Module, num_classes: int, in_channels: int, small_input: bool):
    layers = list(net.features)
    if in_channels != layers[0].in_channels:
        layers[0] = _fresh_conv(layers[0], in_channels)
    if small_input:
        pools = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
        for i in reversed(pools[-2:]):
            del layers[i]
        net.avgpool = nn.AdaptiveAvgPool2d(1)
        channels = [m.out_channels for m in layers if isinstance(m, nn.Conv2d)][-1]
        net.classifier[0] = nn.Linear(channels, net.classifier[0].out_features)
    net.features = nn.Sequential(*layers)
    net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)


def _check_spatial_size(model: nn.Module, arch: str, size: tuple[int, int], channels: int,
                        small_input: bool) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, *size))
    except RuntimeError as exc:
        hint = "" if small_input else "; build it with small_input=True for tiny inputs"
        raise ValueError(f"{arch} cannot take a {size[0]}x{size[1]} input{hint} ({exc})") from None
    finally:
        model.train(was_training)


def build_classifier(
    arch: str = "resnet18",
    num_classes: int = 47,
    *,
    weights: Optional[str] = None,
    norm: str = "frozen",
    in_channels: int = 3,
    small_input: bool = False,
    normalize: Optional[str | tuple] = "imagenet",
    check_input_size: Optional[tuple[int, int]] = None,
    return_report: bool = False,
) -> ClassificationModel | tuple[ClassificationModel, CompatReport]:
    """Build an Opacus-compatible classifier.

    Args:
        arch: "resnet18", "vgg11_bn" (VGG-11 with BatchNorm, the paper's DTD model) or "vgg11".
        num_classes: outputs of the new head (DTD 47, MNIST 10).
        weights: None (random init) or "imagenet" (= torchvision's ``IMAGENET1K_V1``; any other
            torchvision weight name works too). Downloaded by torchvision on first use.
        norm: "frozen", "none" (BatchNorm removed) or "group" (see the module docstring).
        in_channels: input channels; a value other than 3 gets a freshly initialised first
            convolution (refused with ``weights``: its pretrained filters would be lost).
        small_input: adapt the network to inputs of about 10x10 pixels (module docstring).
        normalize: "imagenet", "mnist", a ``(mean, std)`` pair of per-channel sequences in pixel
            units, or None (inputs used as they are).
        check_input_size: optional ``(height, width)``: a trial forward checks the spatial size
            survives, then a forward/backward under full backward hooks freezes parameters
            without gradient (Opacus would refuse them) and checks Opacus' hooks work.
        return_report: also return the :class:`~patchdp_opacus.plugin.compat.CompatReport`.

    Returns:
        The model in train mode, or ``(model, report)``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if weights is not None and in_channels != 3:
        raise ValueError(f"in_channels={in_channels} would replace the pretrained first layer; "
                         f"feed 3-channel images to use weights={weights!r}")
    if weights is not None and small_input:
        logger.warning("small_input=True replaces pretrained layers of %s with fresh ones", arch)
    net = _torchvision_net(arch, weights)
    if arch == "resnet18":
        _adapt_resnet(net, num_classes, in_channels, small_input)
    else:
        _adapt_vgg(net, num_classes, in_channels, small_input)
    removed = remove_batchnorm(net) if norm == "none" else []
    if norm == "frozen" and weights is None and any(isinstance(m, _BatchNorm)
                                                    for m in net.modules()):
        logger.warning("norm='frozen' with weights=None: frozen BatchNorm layers keep their "
                       "initial statistics (mean 0, var 1) and act as identity maps")
    if isinstance(normalize, str):
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, a (mean, std) "
                             f"pair or None, got {normalize!r}")
        mean, std = NORMALIZATIONS[normalize]
    else:
        mean, std = normalize if normalize is not None else (None, None)
    if mean is not None and len(mean) != in_channels:
        raise ValueError(f"normalize has {len(mean)} channel(s), the model takes {in_channels}")
    model = ClassificationModel(net, mean, std)
    example = None
    if check_input_size is not None:
        size = (int(check_input_size[0]), int(check_input_size[1]))
        _check_spatial_size(model, arch, size, in_channels, small_input)
        example = torch.zeros(2, in_channels, *size)
    model, report = make_private_compatible(model, norm="frozen" if norm == "frozen" else "group",
                                            example_input=example)
    if norm == "none":
        report.norm = "none"
        logger.info("removed %d BatchNorm layers (norm='none')", len(removed))
    model.train()
    logger.info("built %s (%d classes, %d input channels, weights=%s, norm=%s, small_input=%s)",
                arch, num_classes, in_channels, weights, norm, small_input)
    return (model, report) if return_report else model

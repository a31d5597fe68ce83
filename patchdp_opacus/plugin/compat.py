"""Make ordinary torch models trainable with Opacus 1.6 (full backward hooks).

Opacus 1.6 computes per-sample gradients with *full* backward hooks
(``register_full_backward_hook``). Those wrap every hooked module's output in a
``BackwardHookFunction`` view, and any in-place operation on such an output
raises at forward or backward time. Typical offenders in segmentation models:

* activations / dropouts built with ``inplace=True`` (``nn.ReLU(inplace=True)``
  in torchvision/timm ResNets and smp's ``Conv2dReLU``);
* the residual add ``out += identity`` of torchvision's and timm's ResNet
  ``BasicBlock``/``Bottleneck`` (smp's ResNet encoders subclass torchvision's);
* BatchNorm, which Opacus rejects because a sample's output depends on the
  other samples of its batch.

:func:`make_private_compatible` fixes all three and then validates the result
with ``opacus.validators.ModuleValidator``. Two BatchNorm policies exist:

``norm="group"``
    every BatchNorm becomes ``GroupNorm(gcd(32, C), C)`` with fresh affine
    parameters (the same replacement ``ModuleValidator.fix`` makes);
``norm="frozen"``
    every BatchNorm becomes a :class:`FrozenBatchNorm`: parameters get
    ``requires_grad=False`` and the layer *always* normalises with its running
    statistics, even after ``model.train()``; the statistics never update, so
    no batch statistic leaks into the model.

The module is modified in place and also returned, together with a
:class:`CompatReport` that a training log can print.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models import resnet as _tv_resnet

logger = logging.getLogger(__name__)

__all__ = [
    "CompatReport",
    "FrozenBatchNorm",
    "IncompatibleModelError",
    "OutOfPlaceBasicBlock",
    "OutOfPlaceBottleneck",
    "disable_inplace",
    "freeze_batchnorm",
    "freeze_unused_parameters",
    "make_private_compatible",
    "patch_residual_blocks",
    "replace_batchnorm_with_groupnorm",
    "validate_model",
    "verify_backward_hooks",
]

NORM_POLICIES = ("group", "frozen")


class IncompatibleModelError(RuntimeError):
    """The model still contains layers Opacus cannot train privately."""


@dataclass
class CompatReport:
    """What :func:`make_private_compatible` changed (module / parameter names).

    Attributes:
        norm: the BatchNorm policy applied ("group" or "frozen").
        inplace_disabled: modules whose ``inplace`` flag was switched off.
        residual_blocks_patched: residual blocks whose in-place add was replaced
            by an out-of-place one (``"name (OldClass -> NewClass)"``).
        batchnorm_to_groupnorm: BatchNorm layers replaced by GroupNorm
            (``"name (C channels, G groups)"``).
        batchnorm_frozen: BatchNorm layers turned into :class:`FrozenBatchNorm`.
        frozen_unused_parameters: parameters that received no gradient in a
            trial forward/backward pass and were frozen.
        trainable_parameters: number of trainable scalars after the changes.
        frozen_parameters: number of frozen scalars after the changes.
    """

    norm: str
    inplace_disabled: list[str] = field(default_factory=list)
    residual_blocks_patched: list[str] = field(default_factory=list)
    batchnorm_to_groupnorm: list[str] = field(default_factory=list)
    batchnorm_frozen: list[str] = field(default_factory=list)
    frozen_unused_parameters: list[str] = field(default_factory=list)
    trainable_parameters: int = 0
    frozen_parameters: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON serialisable)."""
        return {
            "norm": self.norm,
            "inplace_disabled": list(self.inplace_disabled),
            "residual_blocks_patched": list(self.residual_blocks_patched),
            "batchnorm_to_groupnorm": list(self.batchnorm_to_groupnorm),
            "batchnorm_frozen": list(self.batchnorm_frozen),
            "frozen_unused_parameters": list(self.frozen_unused_parameters),
            "trainable_parameters": self.trainable_parameters,
            "frozen_parameters": self.frozen_parameters,
        }

    def summary(self) -> str:
        """One line per kind of change, with counts (for training logs)."""
        lines = [
            f"norm policy: {self.norm}",
            f"in-place flags disabled: {len(self.inplace_disabled)}",
            f"residual blocks made out-of-place: {len(self.residual_blocks_patched)}",
            f"BatchNorm -> GroupNorm: {len(self.batchnorm_to_groupnorm)}",
            f"BatchNorm frozen (eval mode, no grad): {len(self.batchnorm_frozen)}",
            f"unused parameters frozen: {len(self.frozen_unused_parameters)}"
            + (f" ({', '.join(self.frozen_unused_parameters)})" if self.frozen_unused_parameters else ""),
            f"parameters: {self.trainable_parameters} trainable, {self.frozen_parameters} frozen",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:  # pragma: no cover - formatting only
        return self.summary()


# ---------------------------------------------------------------------------
# Frozen BatchNorm
# ---------------------------------------------------------------------------


class FrozenBatchNorm(_BatchNorm):
    """BatchNorm that always normalises with its running statistics.

    Instances are produced by :func:`freeze_batchnorm`, which swaps the class of
    an existing ``BatchNorm{1,2,3}d``/``SyncBatchNorm`` so parameters, buffers,
    device and ``state_dict`` keys stay exactly as they were (pretrained
    checkpoints still load). ``train(True)`` is ignored (the module stays in
    eval mode), ``forward`` never uses batch statistics and never updates the
    running statistics, whatever ``self.training`` says.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"FrozenBatchNorm expects at least 2-D input (N, C, ...), got {input.dim()}-D")

    def train(self, mode: bool = True) -> "FrozenBatchNorm":
        # Ignore `mode`: a frozen BatchNorm is always in eval mode.
        return super().train(False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError("FrozenBatchNorm needs running statistics (track_running_stats=True)")
        return F.batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            False,  # never batch statistics, never a running-stat update
            0.0,
            self.eps,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", frozen=True"


def _replace_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_batchnorm(model: nn.Module) -> list[str]:
    """Turn every BatchNorm of ``model`` into a :class:`FrozenBatchNorm` in place.

    Parameters get ``requires_grad=False``; the layers are put in eval mode and
    stay there through later ``model.train()`` calls.

    Returns:
        Names of the frozen layers.

    Raises:
        ValueError: a BatchNorm without running statistics
            (``track_running_stats=False``) cannot be frozen.
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm) or isinstance(module, FrozenBatchNorm):
            continue
        if not module.track_running_stats or module.running_mean is None:
            raise ValueError(
                f"BatchNorm '{name}' has no running statistics (track_running_stats=False); "
                "it cannot be frozen without normalising with batch statistics. Use norm='group'."
            )
        module.__class__ = FrozenBatchNorm
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
        module.train(False)
        names.append(name)
    return names


def replace_batchnorm_with_groupnorm(model: nn.Module, num_groups: int | None = None) -> list[str]:
    """Replace every BatchNorm of ``model`` by ``GroupNorm(gcd(32, C), C)`` in place.

    The GroupNorm layers get fresh affine parameters (weight 1, bias 0), on the
    BatchNorm's device and dtype; ``affine`` is kept. ``num_groups`` overrides
    the group count (it must divide every channel count).

    Returns:
        ``"name (C channels, G groups)"`` for each replaced layer.
    """
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm) and n]
    changed = []
    for name, bn in targets:
        channels = bn.num_features
        groups = num_groups if num_groups is not None else math.gcd(32, channels)
        if channels % groups:
            raise ValueError(f"num_groups={groups} does not divide the {channels} channels of '{name}'")
        ref = bn.weight if bn.weight is not None else bn.running_mean
        kwargs = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        gn = nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine, **kwargs)
        gn.train(bn.training)
        _replace_child(model, name, gn)
        changed.append(f"{name} ({channels} channels, {groups} groups)")
    if isinstance(model, _BatchNorm):
        raise ValueError("the model itself is a BatchNorm layer; wrap it in a container first")
    return changed


# ---------------------------------------------------------------------------
# In-place operations
# ---------------------------------------------------------------------------


def disable_inplace(model: nn.Module) -> list[str]:
    """Switch off the ``inplace`` flag of every module that has one set.

    Covers ``nn.ReLU``, ``ReLU6``, ``LeakyReLU``, ``Hardtanh``, ``ELU``,
    ``SELU``, ``CELU``, ``SiLU``, ``Mish``, ``Hardswish``, ``Hardsigmoid``,
    ``Threshold``, the dropouts and timm's activation modules, i.e. any module
    with a boolean attribute ``inplace`` that is True.

    Returns:
        Names of the modules changed ("" is the root module).
    """
    names = []
    for name, module in model.named_modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
            names.append(name)
    return names


class OutOfPlaceBasicBlock(_tv_resnet.BasicBlock):
    """torchvision ``BasicBlock`` whose residual add is out of place.

    Numerically identical to the parent; only ``out += identity`` becomes
    ``out = out + identity`` (full backward hooks forbid modifying a hooked
    module's output in place).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class OutOfPlaceBottleneck(_tv_resnet.Bottleneck):
    """torchvision ``Bottleneck`` whose residual add is out of place (see
    :class:`OutOfPlaceBasicBlock`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


try:  # timm is optional; smp depends on it, so it is normally there
    from timm.models import resnet as _timm_resnet
except Exception:  # pragma: no cover - timm missing or broken
    _timm_resnet = None


def _timm_tail(block: nn.Module, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """timm blocks' post-residual-branch part, with an out-of-place add."""
    if getattr(block, "se", None) is not None:
        x = block.se(x)
    if getattr(block, "drop_path", None) is not None:
        x = block.drop_path(x)
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    return x + shortcut


if _timm_resnet is not None:

    class OutOfPlaceTimmBasicBlock(_timm_resnet.BasicBlock):
        """timm ``BasicBlock`` with an out-of-place residual add (else identical)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shortcut = x
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.drop_block(x)
            x = self.act1(x)
            x = self.aa(x)
            x = self.conv2(x)
            x = self.bn2(x)
            return self.act2(_timm_tail(self, x, shortcut))

    class OutOfPlaceTimmBottleneck(_timm_resnet.Bottleneck):
        """timm ``Bottleneck`` with an out-of-place residual add (else identical)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shortcut = x
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.act1(x)
            x = self.conv2(x)
            x = self.bn2(x)
            x = self.drop_block(x)
            x = self.act2(x)
            x = self.aa(x)
            x = self.conv3(x)
            x = self.bn3(x)
            return self.act3(_timm_tail(self, x, shortcut))


def _block_classes() -> dict[type, type]:
    """Known residual block classes and their out-of-place replacements."""
    table: dict[type, type] = {
        _tv_resnet.BasicBlock: OutOfPlaceBasicBlock,
        _tv_resnet.Bottleneck: OutOfPlaceBottleneck,
    }
    if _timm_resnet is not None:
        table[_timm_resnet.BasicBlock] = OutOfPlaceTimmBasicBlock
        table[_timm_resnet.Bottleneck] = OutOfPlaceTimmBottleneck
    return table


def patch_residual_blocks(model: nn.Module) -> list[str]:
    """Make the residual add of known ResNet blocks out of place, in place.

    Each torchvision/timm ``BasicBlock``/``Bottleneck`` instance (exact class
    match; smp's ResNet encoders use torchvision's blocks) gets its class
    swapped to an out-of-place subclass: parameters, buffers and ``state_dict``
    keys are unchanged and the output is numerically identical.

    Returns:
        ``"name (OldClass -> NewClass)"`` for each patched block.
    """
    table = _block_classes()
    changed = []
    for name, module in model.named_modules():
        new_cls = table.get(type(module))
        if new_cls is not None:
            old = type(module).__module__ + "." + type(module).__name__
            module.__class__ = new_cls
            changed.append(f"{name} ({old} -> {new_cls.__name__})")
    return changed


# ---------------------------------------------------------------------------
# Trial passes
# ---------------------------------------------------------------------------


def _outputs_to_scalar(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        parts = [_outputs_to_scalar(o) for o in out if isinstance(o, (torch.Tensor, list, tuple, dict))]
        if parts:
            return torch.stack(parts).sum()
    raise TypeError(f"cannot reduce model output of type {type(out).__name__} to a scalar")


def _trial_backward(model: nn.Module, example_input: Any) -> dict[str, torch.Tensor | None]:
    """Run one forward/backward in eval mode; return each trainable param's grad.

    The model's mode and the parameters' existing ``.grad`` are restored.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved_grads = {n: p.grad for n, p in params.items()}
    was_training = model.training
    for p in params.values():
        p.grad = None
    model.train(False)
    try:
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        with torch.enable_grad(), warnings.catch_warnings():
            # the input does not require grad, so the first hooked layer's full
            # backward hook fires on outputs only; torch warns about that.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            out = model(*inputs)
            _outputs_to_scalar(out).backward()
        grads = {n: p.grad for n, p in params.items()}
    finally:
        model.train(was_training)
        for n, p in params.items():
            p.grad = saved_grads[n]
    return grads


def freeze_unused_parameters(model: nn.Module, example_input: Any) -> list[str]:
    """Freeze the parameters that get no gradient from a forward/backward pass.

    Runs ``model(example_input)`` once in eval mode (so no running statistic
    moves), back-propagates the sum of the outputs, and sets
    ``requires_grad=False`` on every trainable parameter whose ``.grad`` stayed
    ``None`` (Opacus fails on trainable parameters without per-sample
    gradients). The model's mode and existing gradients are restored.

    Args:
        model: the model (modified in place).
        example_input: a tensor, or a tuple of positional inputs, e.g. a
            (1, 3, H, W) float tensor.

    Returns:
        Names of the parameters frozen.
    """
    grads = _trial_backward(model, example_input)
    params = dict(model.named_parameters())
    frozen = [n for n, g in grads.items() if g is None]
    for n in frozen:
        params[n].requires_grad_(False)
    if frozen:
        logger.info("froze %d parameters that receive no gradient: %s", len(frozen), ", ".join(frozen))
    return frozen


def verify_backward_hooks(model: nn.Module, example_input: Any) -> None:
    """Check that a forward/backward pass works under full backward hooks.

    Registers a no-op ``register_full_backward_hook`` on every module with
    trainable parameters of its own (as Opacus' hooks mode does), runs one
    forward/backward in eval mode and removes the hooks again.

    Raises:
        IncompatibleModelError: the pass failed (typically an in-place op on a
            hooked module's output that :func:`make_private_compatible` does
            not know how to rewrite); the message carries the original error.
    """
    handles = []
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            handles.append(module.register_full_backward_hook(lambda *args: None))
    try:
        _trial_backward(model, example_input)
    except RuntimeError as exc:
        raise IncompatibleModelError(
            "forward/backward fails under full backward hooks (Opacus hooks mode); usually an "
            f"in-place operation on a layer output that is not rewritten automatically: {exc}"
        ) from exc
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def _count(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def validate_model(model: nn.Module) -> None:
    """Run ``ModuleValidator.validate(model, strict=False)``; raise if anything is left.

    The model is validated in training mode (as Opacus requires); its mode is
    restored afterwards.

    Raises:
        IncompatibleModelError: listing every remaining incompatibility.
    """
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # Opacus only validates models in training mode
    try:
        errors = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(was_training)
    if errors:
        listing = "\n".join(f"  - {e}" for e in errors)
        raise IncompatibleModelError(
            f"model is still incompatible with Opacus after the automatic fixes ({len(errors)} problems):\n{listing}"
        )


def make_private_compatible(
    model: nn.Module,
    norm: str = "group",
    *,
    example_input: Any = None,
    num_groups: int | None = None,
    validate: bool = True,
) -> tuple[nn.Module, CompatReport]:
    """Make ``model`` trainable with Opacus 1.6 hooks; modifies it in place.

    Steps: switch off ``inplace`` flags; make ResNet residual adds out of
    place; apply the BatchNorm policy; if ``example_input`` is given, freeze
    parameters that receive no gradient and check a forward/backward pass under
    full backward hooks; finally validate with Opacus' ``ModuleValidator``.

    Args:
        model: any ``nn.Module``.
        norm: ``"group"`` (BatchNorm → ``GroupNorm(gcd(32, C), C)``, fresh
            affine parameters) or ``"frozen"`` (BatchNorm kept with its
            statistics and affine parameters, frozen, eval mode forever).
        example_input: optional input for the trial pass, e.g. a
            ``(1, 3, H, W)`` tensor (or tuple of positional inputs).
        num_groups: GroupNorm group count override for ``norm="group"``.
        validate: run ``ModuleValidator.validate`` and raise on failure.

    Returns:
        ``(model, report)`` — the same module object and a :class:`CompatReport`.

    Raises:
        ValueError: unknown ``norm``.
        IncompatibleModelError: something is still incompatible (listed).
    """
    if norm not in NORM_POLICIES:
        raise ValueError(f"norm must be one of {NORM_POLICIES}, got {norm!r}")
    report = CompatReport(norm=norm)
    report.inplace_disabled = disable_inplace(model)
    report.residual_blocks_patched = patch_residual_blocks(model)
    if norm == "group":
        report.batchnorm_to_groupnorm = replace_batchnorm_with_groupnorm(model, num_groups=num_groups)
    else:
        report.batchnorm_frozen = freeze_batchnorm(model)
    if example_input is not None:
        report.frozen_unused_parameters = freeze_unused_parameters(model, example_input)
    if validate:
        validate_model(model)
    if example_input is not None:
        verify_backward_hooks(model, example_input)
    report.trainable_parameters, report.frozen_parameters = _count(model)
    logger.info("Opacus compatibility changes:\n%s", report.summary())
    return model, report


"""Fast per-sample clipping modes for Opacus (selected by ``grad_sample_mode``).

``FAST_MODES["bk"]`` -- book-keeping clipping (Bu et al. 2023, "Differentially private
optimization on large model at small cost"): one backward pass; per-sample gradient norms are
computed layer by layer inside it (per-layer choice between ghost norms and instantiated
per-sample gradients, :mod:`patchdp_opacus.fast.layers`); the clipped sum is formed at the
optimizer step from kept per-sample gradients or as a weighted ordinary weight gradient; the
ordinary ``.grad`` that DP discards is not computed.

Integration (what a ``PrivacyEngine`` does with a mode)::

    mode = FAST_MODES["bk"]
    model = mode.wrap_model(model, batch_first=True, loss_reduction="mean", max_grad_norm=C)
    optimizer = mode.optimizer_cls(optimizer, noise_multiplier=z, max_grad_norm=C,
                                   expected_batch_size=B, loss_reduction="mean")
    # under DPDDP (several ranks): mode.distributed_optimizer_cls, expected_batch_size = B / W
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
    # user loop, unchanged: loss = criterion(model(x), y); loss.backward(); optimizer.step();
    # optimizer.zero_grad()  -- criterion reduces per-sample losses by mean (or sum)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from patchdp_opacus.fast.layers import (
    SUPPORTED_LAYERS,
    BKOptions,
    LayerPlan,
    UnsupportedLayerError,
    plan_weight,
)
from patchdp_opacus.fast.distributed import DistributedBKDPOptimizer
from patchdp_opacus.fast.module import BKGradSampleModule
from patchdp_opacus.fast.optimizer import BKDPOptimizer

__all__ = [
    "FAST_MODES",
    "FastMode",
    "BKDPOptimizer",
    "BKGradSampleModule",
    "BKOptions",
    "DistributedBKDPOptimizer",
    "LayerPlan",
    "SUPPORTED_LAYERS",
    "UnsupportedLayerError",
    "plan_weight",
    "wrap_bk",
]


@dataclass(frozen=True)
class FastMode:
    """A selectable per-sample clipping mode.

    Attributes:
        name: the ``grad_sample_mode`` string.
        wrap_model: ``wrap_model(module, *, batch_first=True, loss_reduction="mean",
            max_grad_norm, **options) -> nn.Module`` (an Opacus ``AbstractGradSampleModule``).
        optimizer_cls: a ``DPOptimizer`` subclass with ``DPOptimizer``'s constructor.
        module_cls: the wrapper class ``wrap_model`` returns.
        description: one line for logs and ``--help``.
        distributed_optimizer_cls: the optimizer class for a model wrapped in Opacus' ``DPDDP``
            (noise once per global step, as Opacus' ``DistributedDPOptimizer``), or None if the
            mode is single-process only.
    """

    name: str
    wrap_model: Callable[..., nn.Module]
    optimizer_cls: type
    module_cls: type
    description: str
    distributed_optimizer_cls: Optional[type] = None


def wrap_bk(module: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
            max_grad_norm=None, **options) -> BKGradSampleModule:
    """Wrap ``module`` for bk clipping; ``options`` are :class:`BKOptions` fields."""
    return BKGradSampleModule(module, batch_first=batch_first, loss_reduction=loss_reduction,
                              max_grad_norm=max_grad_norm, **options)


FAST_MODES: dict[str, FastMode] = {
    "bk": FastMode(
        name="bk",
        wrap_model=wrap_bk,
        optimizer_cls=BKDPOptimizer,
        module_cls=BKGradSampleModule,
        description="book-keeping clipping: one backward pass, per-layer ghost or instantiated "
                    "per-sample norms, no ordinary weight gradient",
        distributed_optimizer_cls=DistributedBKDPOptimizer,
    ),
}

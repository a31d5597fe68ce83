"""``DPOptimizer`` for bk mode: clip with the norms computed during backward, then Opacus' noise.

Step (per physical batch; ``N`` samples of the passes since the last step):

1. ``norms`` (N,) from :class:`~patchdp_opacus.fast.module.BKGradSampleModule`: the per-sample
   gradient norms of the per-sample losses, summed over all layers (flat clipping);
2. ``c_i = min(1, C / (norms_i + 1e-6))`` -- exactly Opacus' ``DPOptimizer.clip_and_accumulate``;
3. ``p.summed_grad += sum_i c_i * grad l_i(p)`` for every parameter, formed per layer from the
   kept per-sample gradients or as one weighted ordinary weight gradient
   (:mod:`patchdp_opacus.fast.layers`);
4. unless the step is skipped (``BatchMemoryManager`` chunks but the last), Opacus'
   ``add_noise`` (``p.grad = summed_grad + N(0, (z*C)^2)``), ``scale_grad`` (divide by
   ``expected_batch_size * accumulated_iterations`` for ``loss_reduction="mean"``) and the
   ``step_hook`` (the accountant), then the wrapped optimizer's step.

A parameter that received no gradient in a step (an unused branch) gets a zero clipped sum and
the noise, which is what DP-SGD releases for it (Opacus raises instead).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from opacus.optimizers import DPOptimizer
from torch.optim import Optimizer

from patchdp_opacus.fast.module import OWNER_ATTR, BKGradSampleModule

logger = logging.getLogger(__name__)

__all__ = ["BKDPOptimizer"]


class BKDPOptimizer(DPOptimizer):
    """Opacus ``DPOptimizer`` whose clipping reads the norms and clipped sums that
    :class:`~patchdp_opacus.fast.module.BKGradSampleModule` prepares during backward.

    Same constructor as ``DPOptimizer`` (flat clipping only: ``max_grad_norm`` is a number).
    ``noise_multiplier=0`` gives the exact clipped mean gradient.

    Attributes (for logging and tests, set by every step, skipped or not):
        per_sample_norms: (N,) norms of the last clipped physical batch.
        per_sample_clip_factors: (N,) the factors ``c_i`` applied to it.
    """

    def __init__(self, optimizer: Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: Optional[int], loss_reduction: str = "mean",
                 generator=None, secure_mode: bool = False, **kwargs):
        if isinstance(max_grad_norm, (list, tuple)):
            raise ValueError("bk mode implements flat clipping (one max_grad_norm for the whole "
                             "model); per-layer clipping is not supported")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        super().__init__(optimizer, noise_multiplier=noise_multiplier,
                         max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                         loss_reduction=loss_reduction, generator=generator,
                         secure_mode=secure_mode, **kwargs)
        self._accumulated_iterations = 0
        self.per_sample_norms: Optional[torch.Tensor] = None
        self.per_sample_clip_factors: Optional[torch.Tensor] = None
        owner = self._owner()  # early, readable error if the model was not wrapped
        if owner is not None and owner.loss_reduction != loss_reduction:
            raise ValueError(f"loss_reduction={loss_reduction!r} differs from the wrapped model's "
                             f"{owner.loss_reduction!r}")

    # -- the model --------------------------------------------------------------------------------
    def _owner(self) -> Optional[BKGradSampleModule]:
        owners = {}
        for p in self.params:
            ref = getattr(p, OWNER_ATTR, None)
            owner = ref() if ref is not None else None
            if owner is None:
                raise ValueError(
                    f"a trainable parameter of shape {tuple(p.shape)} is not managed by a "
                    f"BKGradSampleModule (wrap the model with FAST_MODES['bk'].wrap_model before "
                    f"building the DP optimizer; parameters frozen at wrap time cannot be "
                    f"unfrozen later)")
            owners[id(owner)] = owner
        if len(owners) > 1:
            raise ValueError("the optimizer's parameters belong to several bk-wrapped models; "
                             "per-sample clipping needs one model")
        return next(iter(owners.values()), None)

    @property
    def accumulated_iterations(self) -> int:
        """Forward/backward passes clipped by the last ``clip_and_accumulate`` (1 for a normal
        step and for the last chunk of a ``BatchMemoryManager`` logical batch)."""
        return self._accumulated_iterations

    @property
    def grad_samples(self):
        raise RuntimeError("bk mode never materialises p.grad_sample; per-sample norms are in "
                           "optimizer.per_sample_norms after a step")

    # -- DP step ----------------------------------------------------------------------------------
    def clip_and_accumulate(self):
        """Clip per sample (Opacus' flat rule) and add the clipped sum to ``p.summed_grad``."""
        owner = self._owner()
        batch = owner.pop_batch()
        if batch.num_passes == 0:
            raise ValueError("optimizer.step() found no per-sample gradients: no backward pass "
                             "through the bk-wrapped model since the last step")
        norms = batch.norms
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        sums = batch.clipped_sums(factors)
        missing = []
        for p in self.params:
            g = sums.pop(id(p), None)
            if g is None:
                missing.append(owner.param_name(p))
                g = torch.zeros_like(p)
            g = g.view_as(p)
            if p.summed_grad is not None:
                p.summed_grad += g
            else:
                p.summed_grad = g
        if missing:
            logger.debug("bk: no gradient reached %d parameter(s) this step (zero clipped sum): "
                         "%s", len(missing), missing[:5])
        self._accumulated_iterations = batch.num_passes
        self.per_sample_norms = norms
        self.per_sample_clip_factors = factors

    def pre_step(self, closure: Optional[Callable[[], float]] = None) -> Optional[bool]:
        """Opacus' ``pre_step`` with bk clipping (same skip / noise / scale / hook order)."""
        if len(self.params) == 0:
            return True
        self.clip_and_accumulate()
        if self._check_skip_next_step():
            self._is_last_step_skipped = True
            return False
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = False):
        """Opacus' ``zero_grad``; also forgets backpropagated passes that were never stepped."""
        super().zero_grad(set_to_none)
        owner = self._owner() if self.params else None
        if owner is not None:
            owner.discard_finished()

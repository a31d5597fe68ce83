"""Opacus' ghost clipping criterion, checked for the patch-level mode.

In ``grad_sample_mode="ghost"`` Opacus returns a wrapped criterion whose value (a
``DPTensorFastGradientClipping``) holds the per-sample losses; its ``backward`` runs a first
backward for the per-sample norms, then a second one of ``sum_i c_i * l_i`` with each sample's
clip factor ``c_i``.  Two ways this releases an unclipped gradient, which the checked versions
below refuse:

* arithmetic with a plain tensor (``loss + aux_loss``, ``loss * batch_statistic``): the tensor
  is added to every sample's loss, so in the second backward it is weighted by the *sum* of
  the clip factors -- no per-sample clipping -- and a data-dependent factor couples samples.
  Only Python numbers and other wrapped losses may be combined with the wrapped loss;
* an optimizer step after a backward that did not go through the wrapped criterion: the
  gradient in ``p.grad`` is then the plain batch gradient, while the per-sample norms of an
  earlier step are still lying around.  :class:`CheckedDPTensor` leaves a token with the number
  of per-sample losses on the optimizer, which the logical-batch guard consumes at each step
  (:func:`pop_clipped_rows`); a step without a token raises.
"""

from __future__ import annotations

import numbers

from opacus.utils.fast_gradient_clipping_utils import (
    DPLossFastGradientClipping,
    DPTensorFastGradientClipping,
)

from patchdp_opacus.plugin.integrity import CLIPPED_GRADS, PerSampleIntegrityError

TOKEN = "_patchdp_ghost_rows"


class GhostLossError(TypeError):
    """The wrapped ghost-mode loss was combined with something that escapes clipping."""


class CheckedDPTensor(DPTensorFastGradientClipping):
    """The ghost-mode loss value: per-sample losses, combinable only with numbers and with
    other wrapped losses of the same batch."""

    def _wrap(self, loss_per_sample) -> "CheckedDPTensor":
        return CheckedDPTensor(self.module, self.optimizer, loss_per_sample, self.loss_reduction)

    def _operand(self, other, op: str):
        if isinstance(other, DPTensorFastGradientClipping):
            if other.loss_per_sample.shape != self.loss_per_sample.shape:
                raise GhostLossError(f"loss {op} loss: per-sample losses of different batches "
                                     f"({tuple(self.loss_per_sample.shape)} vs "
                                     f"{tuple(other.loss_per_sample.shape)})")
            return other.loss_per_sample
        if isinstance(other, numbers.Number) and not isinstance(other, bool):
            return other
        raise GhostLossError(
            f"loss {op} {type(other).__name__}: in ghost mode the criterion's value may only be "
            f"combined with Python numbers and with other values of the criterion make_private "
            f"returned. A tensor would be added to every sample's loss and escape per-sample "
            f"clipping (or scale it by a statistic of the batch); compute auxiliary losses "
            f"with the wrapped criterion too, or use grad_sample_mode='hooks' or 'bk'")

    def __add__(self, other):
        return self._wrap(self.loss_per_sample + self._operand(other, "+"))

    def __radd__(self, other):
        return self._wrap(self._operand(other, "+") + self.loss_per_sample)

    def __sub__(self, other):
        return self._wrap(self.loss_per_sample - self._operand(other, "-"))

    def __rsub__(self, other):
        return self._wrap(self._operand(other, "-") - self.loss_per_sample)

    def __mul__(self, other):
        return self._wrap(self.loss_per_sample * self._operand(other, "*"))

    def __rmul__(self, other):
        return self.__mul__(other)

    def __truediv__(self, other):
        return self._wrap(self.loss_per_sample / self._operand(other, "/"))

    def __neg__(self):
        return self._wrap(-self.loss_per_sample)

    def backward(self):
        rows = int(self.loss_per_sample.shape[0])
        super().backward()
        setattr(self.optimizer, TOKEN, getattr(self.optimizer, TOKEN, 0) + rows)
        # p.grad is now the clipped sum the step will noise: the step checks it is unchanged
        setattr(self.optimizer, CLIPPED_GRADS,
                {id(p): None if p.grad is None else p.grad.detach().clone()
                 for p in self.optimizer.params})


class CheckedDPLoss(DPLossFastGradientClipping):
    """Opacus' ghost criterion wrapper whose values are :class:`CheckedDPTensor`."""

    def __call__(self, *args, **kwargs) -> CheckedDPTensor:
        value = super().__call__(*args, **kwargs)
        return CheckedDPTensor(value.module, value.optimizer, value.loss_per_sample,
                               value.loss_reduction)


def pop_clipped_rows(optimizer) -> int:
    """Per-sample losses clipped by ghost backward passes since the last step (and forget
    them); raises when the step's gradient did not come from the wrapped criterion."""
    rows = getattr(optimizer, TOKEN, None)
    if not rows:
        raise PerSampleIntegrityError(
            "ghost mode: optimizer.step() after a backward that did not go through the "
            "criterion make_private returned: the gradient is not clipped per sample. Compute "
            "the loss with that criterion (and only combine it with numbers or with its own "
            "values)")
    setattr(optimizer, TOKEN, 0)
    return rows


__all__ = ["CheckedDPLoss", "CheckedDPTensor", "GhostLossError", "pop_clipped_rows"]

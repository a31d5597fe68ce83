"""bk clipping under Opacus' ``DPDDP`` (several processes, one global batch).

Each of the ``W`` ranks runs the bk model on its slice of ``b = B / W`` samples of the global
batch of ``B`` and clips every one of its samples locally (per-sample clipping needs nothing
from the other ranks). The step then does exactly what Opacus' ``DistributedDPOptimizer`` does
for the hooks mode:

1. rank ``r`` forms its clipped sum ``S_r = sum_{i in slice r} c_i g_i``;
2. only rank 0 adds the noise: ``p.grad = S_0 + N(0, (z C)^2)``, the other ranks
   ``p.grad = S_r``;
3. ``scale_grad`` divides by ``expected_batch_size = b`` (the per-rank batch;
   ``loss_reduction="mean"``);
4. all-reduce (sum) and divide by ``W``:
   ``p.grad = (sum_r S_r + N(0, (z C)^2)) / (b W) = (S + N(0, (z C)^2)) / B``.

So the released gradient is the single-process DP-SGD update of the global batch: the clipped
global sum ``S`` (sensitivity ``C`` per sample under add/remove, ``2C`` under substitution, as
in one process) plus *one* Gaussian of std ``z C``. Adding noise on every rank would give std
``sqrt(W) z C`` -- more noise than accounted for, harmless for privacy but wrong for utility and
not what the accountant models; the test suite checks the std is ``z C``. Every rank's
accountant records one step per global step (the step hook runs once per non-skipped step on
each rank, with the global sample rate). The models stay identical because every rank applies
the same all-reduced gradient (``DPDDP`` broadcast the initial weights).

Only Opacus' ``DPDDP`` is supported: torch's ``DistributedDataParallel`` all-reduces the ordinary
``.grad`` during backward, which bk never computes (the wrapper refuses it).
"""

from __future__ import annotations

from opacus.optimizers import DistributedDPOptimizer

from patchdp_opacus.fast.optimizer import BKDPOptimizer

__all__ = ["DistributedBKDPOptimizer"]


class DistributedBKDPOptimizer(BKDPOptimizer, DistributedDPOptimizer):
    """:class:`~patchdp_opacus.fast.optimizer.BKDPOptimizer` for ``DPDDP`` runs.

    Method resolution: clipping (``clip_and_accumulate``, ``pre_step``) is bk's; ``add_noise``
    (rank 0 only), ``reduce_gradients`` (all-reduce, divide by the world size) and ``step``
    (``pre_step``, then the reduction, then the wrapped optimizer) are Opacus'
    ``DistributedDPOptimizer``'s. Same constructor as ``DPOptimizer``; needs an initialised
    ``torch.distributed`` process group. ``expected_batch_size`` is the per-rank batch
    ``B / world_size``.
    """

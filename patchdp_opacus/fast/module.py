"""The bk-mode model wrapper: one backward pass, per-sample norms computed inside it.

:class:`BKGradSampleModule` wraps a model (like Opacus' ``GradSampleModule``; it subclasses
``opacus.grad_sample.AbstractGradSampleModule``) and registers, on every module that owns
trainable parameters,

* a forward pre-hook that (``skip_weight_grad``) clears ``requires_grad`` of the module's
  parameters for the duration of its forward call when the input requires grad, so the autograd
  node is recorded with ``output_mask = (True, False, False)``: autograd computes the input
  gradient only, never the ordinary weight gradient that DP-SGD throws away (a layer whose
  input does not require grad, i.e. the first layer, keeps its parameters' flags: otherwise no
  backward would reach it; its ordinary ``.grad`` is computed and overwritten at the step);
* a forward hook that restores the flags, keeps the layer input ``A`` (a detached alias, no
  copy) and registers a tensor hook on the output;
* the tensor hook, called by autograd with ``G = dL/d output``, which immediately computes the
  layer's per-sample squared gradient norms with the rule and plan of
  :mod:`patchdp_opacus.fast.layers` and adds them to the running total of its forward pass.

Loss reduction. With ``loss = (1/B) sum_i l_i`` (``loss_reduction="mean"``) autograd delivers
``G = (1/B) dl_i/d out``; like Opacus' hooks (which multiply the backprops by the batch size)
every per-sample quantity is scaled by ``s = B`` (``s = 1`` for "sum"), so the norms are those
of the per-sample losses ``l_i``:  ``||grad l_i||^2 = s^2 * sum_layers ||g_i||^2``, and the
clipped sum uses the weights ``w_i = c_i * s``. The scale is applied to ``(B,)`` vectors, never
to ``G``. ``DPOptimizer.scale_grad`` then divides by ``expected_batch_size``.

A *pass* is one call of the wrapper's ``forward`` in training mode with grad enabled; its
samples are the rows of the batch dimension (dim 0, checked to agree across layers). Several
passes before one optimizer step (gradient accumulation) are several sample sets, as Opacus
treats a list of ``grad_sample`` tensors; ``accumulated_iterations`` counts them.

Shared modules (one module called several times in one forward) are supported: each use's
per-sample gradient is instantiated and summed per sample before the norm is taken (the
gradient of a shared weight is the sum over its uses). Parameters shared between *different*
modules (weight tying) are refused at wrap time. Activation checkpointing (forward during
backward) and a second backward through the same forward pass (``retain_graph=True``) are
refused with an error.
"""

from __future__ import annotations

import logging
import weakref
from functools import partial
from typing import Optional

import torch
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn

from patchdp_opacus.fast.layers import (
    BKOptions,
    LayerPlan,
    UnsupportedLayerError,
    _sq_norms,
    _weighted_sum,
    rule_for,
)

logger = logging.getLogger(__name__)

__all__ = ["BKGradSampleModule", "OWNER_ATTR"]

#: Attribute set on every parameter a :class:`BKGradSampleModule` manages (a weak reference to
#: the wrapper); :class:`~patchdp_opacus.fast.optimizer.BKDPOptimizer` finds its model by it.
OWNER_ATTR = "_patchdp_bk_owner"


class _Layer:
    """A hooked module: its name, rule, trainable parameters and a stack of toggled names."""

    __slots__ = ("name", "module", "rule", "params", "stack")

    def __init__(self, name, module, rule, params):
        self.name = name
        self.module = module
        self.rule = rule
        self.params = params  # name -> Parameter (trainable when wrapped)
        self.stack = []       # per forward call: list of parameter names switched off, or None


class _Record:
    """One forward use of a hooked layer inside one pass."""

    __slots__ = ("layer", "params", "act", "act_version", "grad", "grad_version", "kept",
                 "scale", "seen", "pass_")

    def __init__(self, layer, params, act, pass_):
        self.layer = layer
        self.params = params  # name -> Parameter, trainable at forward time
        self.act = act
        self.act_version = act._version
        self.grad = None
        self.grad_version = None
        self.kept = {}
        self.scale = 1.0
        self.seen = False
        self.pass_ = pass_


class _Pass:
    """Records and running per-sample squared norms of one forward pass."""

    __slots__ = ("index", "records", "uses", "batch_size", "sq", "shared", "has_grad")

    def __init__(self, index):
        self.index = index
        self.records = []
        self.uses = {}         # id(module) -> number of records
        self.batch_size = None
        self.sq = None         # (B,) fp32 running sum of squared norms (non-shared layers)
        self.shared = {}       # id(module) -> (params, {param name: (B, *shape) summed per-sample grads})
        self.has_grad = False

    def add(self, record):
        self.records.append(record)
        key = id(record.layer.module)
        self.uses[key] = self.uses.get(key, 0) + 1

    def check_batch(self, n, name):
        if self.batch_size is None:
            self.batch_size = n
        elif self.batch_size != n:
            raise RuntimeError(
                f"module {name!r} saw {n} samples in dimension 0 but other layers of the same "
                f"forward pass saw {self.batch_size}: bk mode needs every hooked layer to get the "
                f"batch in dimension 0 (batch_first=True) without folding samples together")

    def add_sq(self, sq):
        self.sq = sq.clone() if self.sq is None else self.sq.add_(sq)

    def norms(self) -> torch.Tensor:
        """(B,) per-sample gradient norms of this pass (shared modules included)."""
        sq = self.sq
        for _, bufs in self.shared.values():
            for t in bufs.values():
                extra = _sq_norms(t)
                sq = extra if sq is None else sq + extra
        return sq.sqrt()


class BKBatch:
    """The passes consumed by one optimizer step, with their per-sample norms.

    Attributes:
        norms: (N,) fp32, per-sample gradient norms (of the per-sample losses), the passes
            concatenated in order; N = total samples.
        num_passes: passes (forward/backward rounds) in this batch.
    """

    def __init__(self, passes, owner):
        self._passes = passes
        self._owner = owner
        self.num_passes = len(passes)
        norms = [p.norms() for p in passes]
        self.norms = torch.cat(norms) if norms else torch.zeros(0)

    def clipped_sums(self, factors: torch.Tensor) -> dict:
        """``{id(param): sum_i factors_i * grad l_i(param)}`` in each parameter's dtype.

        ``factors`` (N,) are per-sample clip factors aligned with :attr:`norms`. Records are
        released as they are used."""
        out = {}

        def add(param, value):
            key = id(param)
            if key in out:
                out[key] += value
            else:
                out[key] = value

        offset = 0
        for p in self._passes:
            n = p.batch_size
            c = factors[offset: offset + n]
            offset += n
            for rec in p.records:
                if not rec.seen:
                    continue
                w = c * rec.scale
                for pn, t in rec.kept.items():
                    param = rec.params[pn]
                    add(param, _weighted_sum(w.to(t.device), t, param.dtype))
                if rec.grad is not None:
                    layer = rec.layer
                    if rec.grad._version != rec.grad_version or rec.act._version != rec.act_version:
                        raise RuntimeError(
                            f"the kept input or output gradient of module {layer.name!r} was "
                            f"modified in place between backward and optimizer.step()")
                    param = rec.params["weight"]
                    add(param, layer.rule.recompute(layer.module, rec.act, rec.grad,
                                                     w.to(rec.grad.device), param.dtype))
                rec.kept = {}
                rec.act = rec.grad = None
            for params, bufs in p.shared.values():
                for pn, t in bufs.items():
                    param = params[pn]
                    add(param, _weighted_sum(c.to(t.device), t, param.dtype))
            p.shared = {}
            p.records = []
        if offset != factors.numel():
            raise ValueError(f"expected {offset} clip factors, got {factors.numel()}")
        return out


class BKGradSampleModule(AbstractGradSampleModule):
    """Wrap ``m`` for book-keeping DP-SGD (one backward pass, no per-sample gradient storage
    beyond what the cost model keeps). Forward passes through to ``m``.

    Args:
        m: the model; every module owning trainable parameters must be one of
            :data:`~patchdp_opacus.fast.layers.SUPPORTED_LAYERS` (frozen layers of any type
            are fine), else :class:`~patchdp_opacus.fast.layers.UnsupportedLayerError`.
        batch_first: must be True (the sample dimension is dim 0 of every hooked tensor).
        loss_reduction: "mean" or "sum", how the loss reduces over samples (see module doc).
        max_grad_norm: accepted for interface parity with Opacus' ghost wrapper; the clip
            norm lives in the optimizer.
        options: a :class:`~patchdp_opacus.fast.layers.BKOptions`, or its fields as keywords.
    """

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean",
                 max_grad_norm=None, options: Optional[BKOptions] = None, **option_kwargs):
        if not batch_first:
            raise NotImplementedError("bk mode needs batch_first=True (samples in dimension 0)")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if isinstance(m, AbstractGradSampleModule):
            raise ValueError(f"the model is already wrapped by {type(m).__name__}; pass the plain "
                             f"nn.Module")
        if isinstance(m, nn.parallel.DistributedDataParallel):
            raise ValueError(
                "bk mode never computes the ordinary .grad that torch's DistributedDataParallel "
                "all-reduces during backward; wrap the model in Opacus' DPDDP "
                "(opacus.distributed.DifferentiallyPrivateDistributedDataParallel) instead: the "
                "bk optimizer then all-reduces the clipped, noised gradients")
        if options is not None and option_kwargs:
            raise ValueError("pass either options= or option keywords, not both")
        layers = _discover(m)  # validate before touching the parameters
        super().__init__(m, batch_first=batch_first, loss_reduction=loss_reduction)
        self.options = options if options is not None else BKOptions(**option_kwargs)
        self.max_grad_norm = max_grad_norm
        self._layers = layers
        self._param_names = {}
        self._passes = []
        self._current: Optional[_Pass] = None
        self._in_forward = False
        self._pass_counter = 0
        self._plans = {}
        self._handles = []
        ref = weakref.ref(self)
        for layer in layers:
            for pn, p in layer.params.items():
                setattr(p, OWNER_ATTR, ref)
                self._param_names[id(p)] = f"{layer.name}.{pn}" if layer.name else pn
            self._handles.append(layer.module.register_forward_pre_hook(
                partial(self._pre_hook, layer), with_kwargs=True))
            self._handles.append(layer.module.register_forward_hook(
                partial(self._forward_hook, layer), with_kwargs=True))
        logger.info("bk mode: %d hooked layers, %d trainable parameters, options %s",
                    len(layers), len(self._param_names), self.options)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        capturing = self.training and torch.is_grad_enabled()
        previous, was_in = self._current, self._in_forward
        self._current = _Pass(self._pass_counter) if capturing else None
        self._pass_counter += 1
        self._in_forward = True
        ok = False
        try:
            out = self._module(*args, **kwargs)
            ok = True
            return out
        finally:
            self._restore_flags()
            if ok and self._current is not None and self._current.records:
                self._passes.append(self._current)
            self._current, self._in_forward = previous, was_in

    def _capturing(self, module) -> bool:
        return self._current is not None and module.training and torch.is_grad_enabled()

    def _pre_hook(self, layer, module, args, kwargs):
        entry = None
        if self._capturing(module) and self.options.skip_weight_grad:
            x = _first_input(args, kwargs)
            if isinstance(x, torch.Tensor) and x.requires_grad:
                entry = [pn for pn, p in layer.params.items() if p.requires_grad]
                for pn in entry:
                    layer.params[pn].requires_grad_(False)
        layer.stack.append(entry)
        return None

    def _forward_hook(self, layer, module, args, kwargs, output):
        entry = layer.stack.pop() if layer.stack else None
        if entry is not None:
            for pn in entry:
                layer.params[pn].requires_grad_(True)
        if not (module.training and torch.is_grad_enabled()):
            return None
        if not self._in_forward:
            raise RuntimeError(
                f"module {layer.name!r} ran in training mode with grad enabled outside the "
                f"forward of its BKGradSampleModule: its samples could not be matched with the "
                f"other layers' (call the wrapped model, or use torch.no_grad()/eval())")
        if self._current is None:
            return None
        if getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1:
            raise RuntimeError(
                f"module {layer.name!r} ran forward during a backward pass (activation "
                f"checkpointing?); bk mode does not support recomputed forwards")
        trainable = entry if entry is not None else [pn for pn, p in layer.params.items()
                                                     if p.requires_grad]
        if not trainable:
            return None
        if not isinstance(output, torch.Tensor):
            raise UnsupportedLayerError(f"module {layer.name!r} returned {type(output).__name__}, "
                                        f"expected a tensor")
        if not output.requires_grad:
            return None
        x = _first_input(args, kwargs)
        rec = _Record(layer, {pn: layer.params[pn] for pn in trainable}, x.detach(), self._current)
        self._current.add(rec)
        output.register_hook(partial(self._on_grad, rec))
        return None

    def _restore_flags(self):
        for layer in self._layers:
            while layer.stack:
                entry = layer.stack.pop()
                for pn in entry or ():
                    layer.params[pn].requires_grad_(True)

    # -- backward -----------------------------------------------------------------------------
    def _on_grad(self, rec: _Record, grad: torch.Tensor):
        layer = rec.layer
        if rec.seen:
            raise RuntimeError(
                f"a second gradient reached module {layer.name!r} for the same forward pass "
                f"(backward twice through one graph, e.g. retain_graph=True); bk mode clips per "
                f"forward pass: add the losses and call backward once")
        rec.seen = True
        if rec.act._version != rec.act_version:
            raise RuntimeError(
                f"the input of module {layer.name!r} was modified in place after its forward "
                f"call; its per-sample gradient cannot be computed (remove the in-place op)")
        n = grad.shape[0]
        if rec.act.shape[0] != n:
            raise RuntimeError(f"module {layer.name!r}: input batch {rec.act.shape[0]} != output "
                               f"gradient batch {n}")
        p = rec.pass_
        p.check_batch(n, layer.name)
        rec.scale = float(n) if self.loss_reduction == "mean" else 1.0
        opts = self.options
        if p.uses[id(layer.module)] > 1:
            ps = layer.rule.per_sample(layer.module, rec.act, grad, rec.params, opts)
            params, bufs = p.shared.setdefault(id(layer.module), (rec.params, {}))
            for pn, t in ps.items():
                t = t * rec.scale
                bufs[pn] = t if pn not in bufs else bufs[pn] + t
            rec.act = None
            self._plans[layer.name] = LayerPlan(norm="instantiate", storage="keep(shared)")
        else:
            plan, sq, kept, need_io = layer.rule.backward(layer.module, rec.act, grad, rec.params,
                                                          opts)
            p.add_sq(sq * (rec.scale ** 2))
            rec.kept = kept
            if need_io:
                rec.grad = grad  # the very tensor autograd passed: never modified in place
                rec.grad_version = grad._version
            else:
                rec.act = None
            if layer.name not in self._plans:
                logger.debug("bk plan %s: %s", layer.name, plan)
            self._plans[layer.name] = plan
        p.has_grad = True
        return None

    # -- step-side API --------------------------------------------------------------------------
    def per_sample_norms(self) -> torch.Tensor:
        """(N,) per-sample gradient norms of the passes that have received gradients and were
        not consumed yet (does not consume them)."""
        norms = [p.norms() for p in self._passes if p.has_grad]
        return torch.cat(norms) if norms else torch.zeros(0)

    def pop_batch(self) -> BKBatch:
        """Consume every pass that received gradients (passes without any gradient are
        dropped: forward calls that were never backpropagated)."""
        done = [p for p in self._passes if p.has_grad]
        dropped = len(self._passes) - len(done)
        if dropped:
            logger.debug("bk: dropping %d forward pass(es) that received no gradient", dropped)
        self._passes = []
        return BKBatch(done, self)

    def discard_finished(self):
        """Forget passes that received gradients (``zero_grad`` without a step); passes still
        waiting for their backward are kept."""
        self._passes = [p for p in self._passes if not p.has_grad]

    def layer_plans(self) -> dict:
        """``{module name: LayerPlan}`` of the most recent backward pass of every layer."""
        return dict(self._plans)

    def param_name(self, param) -> str:
        return self._param_names.get(id(param), f"<parameter {tuple(param.shape)}>")

    def managed_parameters(self):
        """Parameters hooked by this wrapper (trainable when it was created)."""
        for layer in self._layers:
            yield from layer.params.values()

    # -- Opacus GSM API -------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = False):
        self.discard_finished()
        super().zero_grad(set_to_none)

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._restore_flags()
        self._passes = []

    def cleanup(self):
        super().cleanup()
        for layer in self._layers:
            for p in layer.params.values():
                if hasattr(p, OWNER_ATTR):
                    delattr(p, OWNER_ATTR)


def _first_input(args, kwargs):
    if args:
        return args[0]
    return kwargs.get("input", next(iter(kwargs.values()), None))


def _discover(model: nn.Module) -> list:
    """Hookable layers of ``model``; raises for unsupported trainable modules and for
    parameters shared between modules."""
    owner = {}
    layers = []
    for name, module in model.named_modules():
        trainable = {pn: p for pn, p in module._parameters.items()
                     if p is not None and p.requires_grad}
        if not trainable:
            continue
        for pn, p in trainable.items():
            if id(p) in owner:
                raise UnsupportedLayerError(
                    f"parameter {name}.{pn} is the same tensor as {owner[id(p)]} (tied weights); "
                    f"bk mode cannot split its per-sample gradient between modules")
            owner[id(p)] = f"{name}.{pn}"
        rule = rule_for(name, module, list(trainable))
        layers.append(_Layer(name, module, rule, trainable))
    return layers

"""What the Theorem-2 accountant assumes about each noisy step, checked while training runs.

The accountant composes one Gaussian step per *logical* batch: ``B`` records drawn uniformly
without replacement, each contributing one clipped per-sample gradient of norm ``<= C``, noise
std ``z * C`` added once.  Three ways a training loop can release something else without any
error from Opacus, and what this module does about each:

1. **Several draws in one noisy step.** Opacus' ``optimizer.signal_skip_step(do_skip=True)``
   (manual accumulation), a ``BatchMemoryManager`` loop left mid logical batch whose leftover
   chunks then join the next batch, or stale skip flags from prefetching workers after such a
   break: the noisy step then sums samples of two independent draws (an image can enter twice,
   ``q`` is wrong).  :class:`LogicalBatchGuard` counts per-sample rows: a noisy step happens
   exactly when the rows stepped since the last one reach the local logical batch size, never
   more; a chunk whose skip flag disagrees raises.  Every chunk is tagged with the logical batch
   the sampler drew it from (``BatchMemoryManager`` signals the optimizer once per chunk while
   the sampler yields, see :mod:`patchdp_opacus.plugin.sampler`), and a logical batch left
   unfinished when a new pass over the loader starts is **discarded with a warning** (its
   clipped sum is dropped, nothing is released; the accountant is not charged).  A chunk that
   is taken from the loader but never stepped (``continue`` in the loop) would shift every
   later chunk into the wrong logical batch: the guard counts chunks signalled against steps
   taken, which with ``num_workers`` workers must differ by exactly the prefetch depth
   (``prefetch_factor * num_workers``, 0 without workers) while the pass still samples, and
   raises otherwise.  Limitation: in the last ``prefetch_factor * num_workers`` chunks of a pass
   (already sampled, so nothing is signalled any more) a chunk skipped this way cannot be
   detected with workers; without workers it always is.
2. **Rows that are not samples.** A model that folds each image into several rows of dimension
   0 (tiles) gets one clipped gradient per row: the sensitivity of one image is then the sum of
   several clip norms.  :class:`ModuleIntegrity` records the batch size the model was called
   with and the guard requires as many per-sample gradient rows (hooks, ghost and bk alike).
3. **Layers that mix samples without trainable parameters.** BatchNorm in training mode (also
   with frozen or no affine parameters) normalises with batch statistics, so one image changes
   every other sample's gradient (sensitivity above ``2C``) and the running statistics, which
   are released without noise; any forward pass that updates a buffer releases a batch
   statistic.  :class:`ModuleIntegrity` refuses both at every training forward.

Noise (:class:`NoiseSource`): by default drawn from a ``torch.Generator`` seeded with OS entropy
(never from ``torch.manual_seed``), so that a released model with its config cannot be
de-noised; ``secure`` reseeds it from the OS at every step and uses Opacus' floating-point
attack mitigation (sum of four Gaussians); a user-supplied generator is used as given and
reported as reproducible.
"""

from __future__ import annotations

import copy
import functools
import logging
import secrets
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from patchdp_opacus.plugin.accountant import GradientAccumulationError
from patchdp_opacus.plugin.compat import FrozenBatchNorm

__all__ = ["GradientAccumulationError", "LogicalBatchError", "LogicalBatchGuard",
           "ModuleIntegrity", "NoiseSource", "NoiseSourceMixin", "PerSampleIntegrityError",
           "SampleMixingError", "mixing_modules", "rows_from_grad_samples", "with_mixins"]

logger = logging.getLogger(__name__)


class LogicalBatchError(RuntimeError):
    """A noisy step would not release exactly one logical batch."""


class PerSampleIntegrityError(RuntimeError):
    """Per-sample gradient rows are not the samples the model was called with."""


class SampleMixingError(RuntimeError):
    """A layer makes one sample's output depend on the other samples of its batch."""


_FROZEN_BN = "use patchdp_opacus.plugin.compat.make_private_compatible(model, norm='frozen' or " \
             "'group'), or keep the layer in eval mode (module.eval() after model.train())"

def _batch_statistics(m) -> bool:
    """torch normalises with batch statistics when ``training or running_mean is None``."""
    return isinstance(m, _BatchNorm) and not isinstance(m, FrozenBatchNorm) and (
        m.training or getattr(m, "running_mean", None) is None)


#: (condition on the module in its current mode, why) for modules that mix samples.
MIXING_RULES: tuple = (
    (_batch_statistics,
     "BatchNorm normalising with the statistics of the batch (training mode, or no running "
     "statistics: track_running_stats=False or running_mean None, also in eval mode): other "
     "samples' gradients depend on each image, and running statistics are released without "
     "noise"),
    (lambda m: isinstance(m, _InstanceNorm) and m.training and m.track_running_stats,
     "InstanceNorm with track_running_stats=True updates running statistics from the batch, "
     "released without noise"),
)


def mixing_modules(module: nn.Module) -> list[tuple[str, str]]:
    """``(name, why)`` of the sub-modules that mix samples in their current mode."""
    out = []
    for name, m in module.named_modules():
        for condition, why in MIXING_RULES:
            if condition(m):
                out.append((name or type(m).__name__, why))
                break
    return out


def _written_state(module: nn.Module) -> dict:
    """``{name: (identity, version)}`` of every buffer and frozen parameter: the cheap record
    a training forward pass must leave unchanged (an in-place write bumps the version, a
    reassignment changes the identity; a write through ``.data`` is caught by the full
    comparison at the next step, :class:`ModuleIntegrity`)."""
    named = [(f"buffer {n}", b) for n, b in module.named_buffers() if b is not None]
    named += [(f"parameter {n}", p) for n, p in module.named_parameters() if not p.requires_grad]
    return {name: (id(t), t._version) for name, t in named}


#: Integer dtypes of each element size: tensors are compared bit for bit through them (NaN
#: equals the same NaN, -inf equals -inf, -0.0 differs from 0.0).
_BIT_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.dtype == torch.bool:
        return t
    return t.view(_BIT_DTYPES[t.element_size()])


def _optimizer_state(optimizer) -> dict:
    """Every entry of a torch optimizer's per-parameter state, by group and position."""
    out = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                out[f"optimizer state [{g}][{i}][{key!r}]"] = value
    return out


def _model_state(module: nn.Module) -> dict:
    """Every parameter and buffer of ``module`` by name (the tensors themselves)."""
    state = {f"buffer {n}": b for n, b in module.named_buffers() if b is not None}
    state.update((f"parameter {n}", p) for n, p in module.named_parameters())
    return state


def _batch_rows(args, kwargs) -> Optional[int]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    return None


class ModuleIntegrity:
    """Hooks on the trained model (the module the user holds, so that calling it directly is
    checked like calling its wrapper): refuse sample-mixing layers and state written in
    training-mode forward passes, refuse a model changed outside the DP optimizer's step, and
    record the batch sizes the model was called with (the guard compares them with the
    per-sample gradient rows at the next step).

    The *reference* is a copy of the model's whole state (every parameter and buffer, and which
    parameters are trainable), taken when the engine made the model private and after every
    DP step.  At the start of every optimizer step, and whenever the claim is read or saved
    (``get_epsilon``, the accountant's ``get_epsilon``, ``privacy_report``,
    ``save_checkpoint``), the state must still equal it bit for bit: an update by another
    optimizer, a parameter unfrozen later, running statistics, EMAs or prototypes written by
    the training loop, a data-dependent reordering of weights -- all released with the model
    without noise -- raise instead.  The copy costs the memory of the parameters and buffers
    once more; each comparison reads both (one transfer of a flag per device)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.optimizer = None  # its state is part of the reference once watched
        self.input_rows: list[int] = []
        self._written: Optional[dict] = None
        self.reference: Optional[dict] = None
        self.trainable: frozenset = frozenset()
        self._handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         module.register_forward_hook(self._post, with_kwargs=True)]
        self.take_reference()

    def _active(self) -> bool:
        return self.module.training and torch.is_grad_enabled()

    def watch_optimizer(self, optimizer) -> None:
        """Add the state of ``optimizer`` (the DP optimizer's inner torch optimizer: momentum
        buffers, Adam moments, step counts) to the reference: state planted between steps is
        released by the next DP step's update without noise."""
        self.optimizer = optimizer
        self.take_reference()

    def _state(self) -> dict:
        state = _model_state(self.module)
        if self.optimizer is not None:
            state.update(_optimizer_state(self.optimizer))
        return state

    def take_reference(self) -> None:
        """The state after a DP step (or at make_private, or after a checkpoint load)."""
        state, old = self._state(), self.reference or {}
        with torch.no_grad():
            self.reference = {}
            for name, t in state.items():
                ref = old.get(name)
                if not isinstance(t, torch.Tensor):
                    self.reference[name] = copy.deepcopy(t)
                elif isinstance(ref, torch.Tensor) and ref.shape == t.shape \
                        and ref.dtype == t.dtype and ref.device == t.device:
                    self.reference[name] = ref.copy_(t.detach())
                else:
                    self.reference[name] = t.detach().clone()
        self.trainable = frozenset(n for n, p in self.module.named_parameters()
                                   if p.requires_grad)

    def changed(self) -> list[str]:
        """Names of the parameters and buffers that differ from the reference."""
        if self.reference is None:
            return []
        state = self._state()
        out = sorted(state.keys() ^ self.reference.keys())
        if frozenset(n for n, p in self.module.named_parameters() if p.requires_grad) \
                != self.trainable:
            out.append("which parameters are trainable")
        by_device: dict = {}
        with torch.no_grad():
            for name in state.keys() & self.reference.keys():
                now, ref = state[name], self.reference[name]
                if not isinstance(now, torch.Tensor) or not isinstance(ref, torch.Tensor):
                    if type(now) is not type(ref) or now != ref:
                        out.append(name)
                elif now.shape != ref.shape or now.dtype != ref.dtype or now.device != ref.device:
                    out.append(name)
                else:
                    by_device.setdefault(now.device, []).append(
                        (name, torch.ne(_bits(now), _bits(ref)).any()))
        for items in by_device.values():
            flags = torch.stack([flag for _, flag in items]).cpu().tolist()
            out += [name for (name, _), flag in zip(items, flags) if flag]
        return sorted(out)

    def check_unchanged(self) -> None:
        """Raise if the model changed since the last reference, other than by the DP step."""
        changed = self.changed()
        if changed:
            raise SampleMixingError(
                f"the model changed outside the DP optimizer's step: {changed[:5]}. Whatever "
                f"changes the model must go through the optimizer make_private returned "
                f"(clipped, noised, accounted): not the original optimizer or a second one, not "
                f"parameters unfrozen after make_private (call make_private again with them), "
                f"not statistics or weights written by the training loop. To resume, load "
                f"checkpoints with engine.load_checkpoint")

    def _pre(self, module, args, kwargs):
        if not self._active():
            self._written = None
            return None
        mixing = mixing_modules(module)
        if mixing:
            name, why = mixing[0]
            raise SampleMixingError(
                f"module {name!r} mixes samples in training mode: {why}. Patch- and "
                f"record-level DP-SGD need each sample's gradient to depend on that sample "
                f"only; {_FROZEN_BN}. ({len(mixing)} such module(s): "
                f"{[n for n, _ in mixing][:5]})")
        self._written = _written_state(module)
        rows = _batch_rows(args, kwargs)
        if rows is not None:
            self.input_rows.append(rows)
        return None

    def _post(self, module, args, kwargs, output):
        before, self._written = self._written, None
        if before is None:
            return None
        after = _written_state(module)
        changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
        if changed:
            raise SampleMixingError(
                f"{changed[0]!r} was written by a training-mode forward pass: it holds a "
                f"statistic of the private batch that would be released with the model without "
                f"noise (running statistics of a normalisation layer, an EMA, prototypes, a "
                f"cache, ...); {_FROZEN_BN}, or compute it outside training. Changed: "
                f"{changed[:5]}")
        return None

    def pop_input_rows(self) -> Optional[int]:
        rows = sum(self.input_rows) if self.input_rows else None
        self.input_rows.clear()
        return rows

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


#: Attribute of a ghost-mode optimizer: ``{id(p): copy of p.grad}`` right after the checked
#: clipping backward (:mod:`patchdp_opacus.plugin.ghost`), where ``p.grad`` *is* the clipped sum
#: that the optimizer will noise.
CLIPPED_GRADS = "_patchdp_clipped_grads"


def check_clipped_grads(optimizer) -> None:
    """Ghost mode: the ``.grad`` the step noises must be the clipping backward's, bit for bit
    (not scaled or replaced between backward and step), and no tensor hook on a trainable
    parameter may have rewritten it during the backward."""
    clipped = getattr(optimizer, CLIPPED_GRADS, None)
    if clipped is None:
        return
    hooked = [i for i, p in enumerate(optimizer.params)
              if getattr(p, "_backward_hooks", None) or
              getattr(p, "_post_accumulate_grad_hooks", None)]
    changed = [i for i, p in enumerate(optimizer.params)
               if (p.grad is None) != (clipped.get(id(p)) is None) or
               (p.grad is not None and
                torch.ne(_bits(p.grad), _bits(clipped[id(p)])).any().item())]
    if hooked or changed:
        raise PerSampleIntegrityError(
            f"ghost mode: the gradient of {len(hooked or changed)} parameter(s) is not the "
            f"per-sample-clipped sum of the criterion's backward ("
            + ("tensor hooks on the parameters rewrite it" if hooked else
               "it was changed between backward and step")
            + "): the step would noise an unclipped gradient. Remove parameter hooks and do not "
              "touch .grad between loss.backward() and optimizer.step()")


def _code_outside_torch_optim(function) -> list[str]:
    """Names of the functions a step method runs (itself, what it wraps, the functions in its
    closures, recursively) whose code is not torch.optim's: an optimizer's own step, torch's
    profiling and no-grad wrappers and the learning-rate scheduler's step counter are
    torch.optim's; a subclass's or a patched step is not."""
    import os

    from torch import optim

    home = os.path.dirname(optim.__file__)
    foreign, seen, todo = [], set(), [function]
    while todo:
        fn = todo.pop()
        fn = getattr(fn, "__func__", fn)  # a bound method: its function
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        code = getattr(fn, "__code__", None)
        if code is None:
            foreign.append(repr(fn))  # a callable object: its code is not checked
            continue
        if os.path.dirname(os.path.abspath(code.co_filename)) != home:
            foreign.append(f"{fn.__qualname__} in {code.co_filename}")
        todo.append(getattr(fn, "__wrapped__", None))
        todo += [value for value in map(_cell_value, fn.__closure__ or ())
                 if callable(value) and not isinstance(value, _RUNS_NO_CODE)]
    return foreign


#: Callables that run no Python code of their own (weak references return their object).
_RUNS_NO_CODE = (weakref.ref, type, types.BuiltinFunctionType)


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _global_step_hooks(kind: str) -> dict:
    from torch.optim import optimizer as torch_optimizer

    name = "_global_optimizer_pre_hooks" if kind == "pre" else "_global_optimizer_post_hooks"
    return getattr(torch_optimizer, name, {}) or {}


def rows_from_grad_samples(optimizer) -> int:
    """Per-sample rows of the last clipped chunk, from the parameters' ``grad_sample``."""
    for p in optimizer.params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        return int(sum(g.shape[0] for g in gs)) if isinstance(gs, list) else int(gs.shape[0])
    raise PerSampleIntegrityError("optimizer.step() found no per-sample gradients")


@dataclass
class NoiseSource:
    """Where the Gaussian noise comes from: ``"os"`` (a generator seeded from OS entropy per
    device), ``"secure"`` (reseeded from the OS at every step, four-Gaussian sum against
    floating-point attacks) or ``"user"`` (the generator given, reproducible from its seed)."""

    kind: str = "os"
    generator: Optional[torch.Generator] = None
    _created: Optional[torch.Generator] = None

    @property
    def secure(self) -> bool:
        return self.kind == "secure"

    def describe(self) -> str:
        return {
            "os": "torch generator seeded from OS entropy (not reproducible from any seed)",
            "secure": "torch generator reseeded from OS entropy at every step, with Opacus' "
                      "floating-point attack mitigation (sum of 4 Gaussians)",
            "user": "user-supplied generator: reproducible, and not private if its seed is known",
        }[self.kind]

    def prepare(self, optimizer) -> None:
        """Set ``optimizer.generator`` for the next ``add_noise``."""
        if self.kind == "user":
            optimizer.generator = self.generator
            return
        device = next((p.device for p in optimizer.params), torch.device("cpu"))
        current = optimizer.generator
        if self.kind == "os" and current is not None and current is not self._created:
            self.kind, self.generator = "user", current  # set by the user on the optimizer
            msg = ("optimizer.generator was set by hand: the noise is drawn from it (reported as "
                   "reproducible, not private if its seed is known)")
            logger.warning(msg)
            warnings.warn(msg, stacklevel=4)
            return
        if self.kind == "secure" or current is None or current.device != device:
            generator = torch.Generator(device=device)
            generator.manual_seed(secrets.randbits(63))
            optimizer.generator = self._created = generator


class NoiseSourceMixin:
    """DPOptimizer mixin: the noise generator comes from a :class:`NoiseSource`."""

    _noise_source: Optional[NoiseSource] = None

    def set_noise_source(self, source: NoiseSource) -> None:
        self._noise_source = source
        self.secure_mode = source.secure
        if source.kind == "user":
            self.generator = source.generator

    def add_noise(self):
        if self._noise_source is not None:
            self._noise_source.prepare(self)
        return super().add_noise()


class LogicalBatchGuard(NoiseSourceMixin):
    """DPOptimizer mixin for fixed-size logical batches (see the module docstring, 1 and 2).

    Decides skip / noisy by counting per-sample rows; Opacus' skip queue is replaced by a ledger
    of ``(do_skip, logical batch id)`` entries that ``signal_skip_step`` appends."""

    _guard = None

    def attach_guard(self, *, batch_size: int, sampler, rows: Callable,
                     integrity: Optional[ModuleIntegrity], prefetch: int = 0) -> None:
        """``prefetch``: chunks the loader's workers sample ahead of the training loop
        (``prefetch_factor * num_workers``; ``BatchMemoryManager`` copies both settings)."""
        self._guard = _GuardState(int(batch_size), sampler, rows, integrity, int(prefetch))
        self._step_skip_queue = []
        ref = weakref.WeakMethod(self._new_iteration)

        def on_iteration_start():
            method = ref()
            if method is not None:
                method()

        sampler.on_iteration_start.append(on_iteration_start)

    # The hook Opacus runs inside pre_step (after the noise, before the update) is the
    # engine's accounting hook only.  A hook attached with Opacus' ``attach_step_hook`` (or
    # assigned to ``step_hook``) runs after the update of every noisy step, once the new
    # reference is taken: it may read what the step released, and whatever it changes is
    # caught by the next check -- inside pre_step it could rewrite the noised gradient.
    @property
    def step_hook(self):
        return self.__dict__.get("_accounting_hook")

    @step_hook.setter
    def step_hook(self, fn) -> None:
        self.__dict__["_user_hook"] = fn

    def attach_accounting_hook(self, fn: Callable) -> None:
        """The engine's step hook (charges the accountant): the one hook inside ``pre_step``,
        run once per noisy step (a user hook that chains the hook it read from ``step_hook``
        calls it again after the update: that call does nothing)."""
        def once(optimizer):
            if not self.__dict__.get("_accounted"):
                self.__dict__["_accounted"] = True
                fn(optimizer)

        self.__dict__["_accounting_hook"] = once

    def pre_step(self, closure=None):
        self.__dict__["_accounted"] = False
        g = self._guard
        integrity = g.integrity if g is not None else None
        if integrity is not None:
            check_clipped_grads(self)
        proceed = super().pre_step(closure)
        if proceed and integrity is not None:  # after the closure and every step hook
            if self.original_optimizer is not integrity.optimizer:
                raise SampleMixingError(
                    "the DP optimizer's original_optimizer was replaced after make_private: its "
                    "state and step are not the ones the engine checks. Keep the optimizer "
                    "make_private was given")
            integrity.check_unchanged()  # nothing but this step may change the model
            self._check_only_dp_updates()
        return proceed

    def step(self, closure=None):
        g = self._guard
        out = super().step(closure)
        if g is not None and not getattr(self, "_is_last_step_skipped", False):
            if g.integrity is not None:
                g.integrity.take_reference()  # the DP step is the one allowed change
            user_hook = self.__dict__.get("_user_hook")
            if user_hook is not None:
                user_hook(self)
        return out

    def _check_only_dp_updates(self) -> None:
        """The inner optimizer's step may apply only the noised gradients of the parameters
        the DP optimizer clips: a ``.grad`` on another parameter of its groups (a frozen one,
        which torch's optimizers still update), step hooks (which run inside the step) and a
        step that runs code outside torch.optim (:func:`_code_outside_torch_optim`) are
        refused."""
        inner = self.original_optimizer
        for step in (vars(inner).get("step"), type(inner).step):
            foreign = _code_outside_torch_optim(step)
            if foreign:
                raise SampleMixingError(
                    f"the optimizer's step runs code outside torch.optim ({foreign[:3]}): the "
                    f"engine cannot tell its update from a write of un-noised data into the "
                    f"model. Use a torch.optim optimizer (SGD, Adam, AdamW, ...) with its own "
                    f"step; torch's learning-rate schedulers are fine")
        clipped = {id(p) for p in self.params}
        foreign = [i for group in inner.param_groups for i, p in enumerate(group["params"])
                   if p.grad is not None and id(p) not in clipped]
        if foreign:
            raise SampleMixingError(
                f"{len(foreign)} parameter(s) of the optimizer that the DP optimizer does not "
                f"clip (frozen: requires_grad=False) have a .grad: the optimizer's step would "
                f"apply it without clipping or noise. Do not set .grad on frozen parameters "
                f"(set it to None), or make them trainable before make_private")
        hooks = [(where, len(table)) for where, table in (
            ("the optimizer's step pre-hooks", getattr(inner, "_optimizer_step_pre_hooks", {})),
            ("the optimizer's step post-hooks", getattr(inner, "_optimizer_step_post_hooks", {})),
            ("torch's global optimizer pre-hooks", _global_step_hooks("pre")),
            ("torch's global optimizer post-hooks", _global_step_hooks("post"))) if table]
        if hooks:
            raise SampleMixingError(
                f"step hooks run inside the DP optimizer's step ({hooks}): whatever they change "
                f"would be taken for the noisy update. Remove them (register_step_post_hook, "
                f"register_optimizer_step_post_hook); use optimizer.attach_step_hook only to "
                f"read, or act after optimizer.step() returns")

    def signal_skip_step(self, do_skip=True):
        g = self._guard
        if g is None:
            return super().signal_skip_step(do_skip)
        g.ledger.append((bool(do_skip), g.sampler.last_batch_id))
        g.signals += 1
        g.exhausted = not do_skip and g.sampler.last_batch_id == g.last_id
        return None

    def _check_skip_next_step(self, pop_next=True):
        g = self._guard
        if g is None:
            return super()._check_skip_next_step(pop_next)
        if not pop_next:
            return g.ledger[0][0] if g.ledger else False
        if g.ledger:
            lag = g.signals - g.steps - 1  # chunks sampled ahead of this one, not yet stepped
            if lag > g.prefetch or (lag != g.prefetch and not g.exhausted):
                raise LogicalBatchError(
                    f"a physical chunk was taken from the loader without optimizer.step() "
                    f"({lag} chunks sampled ahead of this step, the loader prefetches "
                    f"{g.prefetch}): later chunks would be released with the wrong logical "
                    f"batch. Step every chunk BatchMemoryManager yields (no `continue` before "
                    f"optimizer.step())")
        flag, batch_id = g.ledger.pop(0) if g.ledger else (None, None)
        g.steps += 1
        rows = g.rows(self)
        inputs = g.integrity.pop_input_rows() if g.integrity is not None else None
        if inputs is not None and inputs != rows:
            raise PerSampleIntegrityError(
                f"the model was called with {inputs} samples since the last step but produced "
                f"{rows} per-sample gradient rows: each sample must be one row of dimension 0 "
                f"in every layer (a model that folds a sample into several rows, e.g. tiles, "
                f"clips each tile separately and one image's sensitivity becomes a multiple of "
                f"C); reshape inside the model so that every hooked layer sees one row per "
                f"sample")
        if batch_id is not None and g.open_id is not None and batch_id != g.open_id:
            raise LogicalBatchError(
                f"a chunk of logical batch {batch_id} arrived while logical batch {g.open_id} was "
                f"open ({g.open_rows} of {g.batch_size} samples stepped): every physical chunk "
                f"of a logical batch must go through optimizer.step()")
        g.open_rows += rows
        g.open_id = batch_id if batch_id is not None else g.open_id
        complete = g.open_rows == g.batch_size
        if g.open_rows > g.batch_size:
            raise GradientAccumulationError(
                f"optimizer.step() would release {g.open_rows} per-sample gradients, more than "
                f"one logical batch ({g.batch_size}): samples of several independent loader "
                f"draws would share one noisy step (an image could enter it twice), which the "
                f"accountant does not cover. Do not accumulate over loader batches (no "
                f"signal_skip_step); use one larger batch_size with "
                f"opacus.utils.batch_memory_manager.BatchMemoryManager")
        if flag is True and complete:
            raise GradientAccumulationError(
                f"signal_skip_step(do_skip=True) for a step that completes logical batch "
                f"{batch_id if batch_id is not None else ''} ({g.batch_size} samples): "
                f"accumulating several loader batches into one noisy step releases independent "
                f"draws together, which the accountant does not cover. Use one larger "
                f"batch_size with BatchMemoryManager(max_physical_batch_size=...) instead")
        if not complete and flag is not True:
            raise LogicalBatchError(
                f"a noisy step would release {g.open_rows} samples, but a logical batch has "
                f"{g.batch_size}: "
                + ("a physical chunk of this logical batch was not stepped"
                   if flag is False else
                   "the step saw only part of the loader's batch; split logical batches with "
                   "BatchMemoryManager(max_physical_batch_size=...), which the engine tracks"))
        if complete:
            g.open_rows, g.open_id = 0, None
            self._check_drawn(g)
            return False
        return True

    def _check_drawn(self, g) -> None:
        """A noisy step releases a logical batch the loader drew in this pass and no earlier
        step released: never a batch of another loader, never the same draw twice."""
        g.noisy += 1
        drawn = g.sampler.last_batch_id - g.first_id + 1
        exhausted = g.sampler.last_batch_id >= g.last_id
        ahead = g.prefetch if (g.signals == 0 and not exhausted) else 0
        if g.noisy > drawn - ahead:
            raise LogicalBatchError(
                f"noisy step {g.noisy} of this pass, but the crop-aware loader has handed out "
                f"only {max(drawn - ahead, 0)} logical batch(es) in it: the step releases data "
                f"the private loader did not draw (another loader, e.g. the one passed to "
                f"make_private instead of the one it returned), or a batch released before "
                f"(several optimizer steps on one batch). Iterate the loader make_private "
                f"returned and call optimizer.step() once per logical batch")

    def _new_iteration(self) -> None:
        """A new pass over the loader starts: discard an unfinished logical batch (nothing of it
        was released) and forget skip flags of chunks that were sampled but never stepped."""
        g = self._guard
        if g.open_rows:
            msg = (f"discarding an unfinished logical batch ({g.open_rows} of {g.batch_size} "
                   f"samples were stepped) left by the previous pass over the loader: its "
                   f"clipped gradients are dropped without a noisy step (the accountant is not "
                   f"charged)")
            logger.warning(msg)
            warnings.warn(msg, stacklevel=2)
            self._is_last_step_skipped = False
            self.zero_grad(set_to_none=True)
            for p in self.params:
                p.summed_grad = None
        g.open_rows, g.open_id = 0, None
        g.ledger.clear()
        g.start_pass()
        if g.integrity is not None:
            g.integrity.input_rows.clear()


@dataclass
class _GuardState:
    batch_size: int
    sampler: object
    rows: Callable
    integrity: Optional[ModuleIntegrity]
    prefetch: int = 0
    open_rows: int = 0
    open_id: Optional[int] = None
    signals: int = 0       # skip signals (one per chunk sampled) in this pass
    steps: int = 0         # optimizer steps in this pass
    noisy: int = 0         # noisy (not skipped) steps in this pass
    exhausted: bool = False  # the pass's last chunk has been sampled
    first_id: int = 0      # id of the pass's first logical batch
    last_id: int = -1      # id of the pass's last logical batch

    def __post_init__(self):
        self.ledger: list = []
        self.start_pass()

    def start_pass(self) -> None:
        """Counters of a new pass over the loader (also before the first one)."""
        self.signals = self.steps = self.noisy = 0
        self.exhausted = False
        self.first_id = self.sampler.last_batch_id + 1
        self.last_id = self.sampler.last_batch_id + len(self.sampler)


@functools.lru_cache(maxsize=None)
def with_mixins(base: type, guard: bool) -> type:
    """``base`` (a DPOptimizer class) with :class:`LogicalBatchGuard` (patch-level mode) or
    only :class:`NoiseSourceMixin` mixed in."""
    mixin = LogicalBatchGuard if guard else NoiseSourceMixin
    return type(f"{mixin.__name__.replace('Mixin', '')}{base.__name__}", (mixin, base),
                {"__module__": __name__, "__doc__": base.__doc__})

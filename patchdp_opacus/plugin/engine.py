"""Drop-in replacement for ``opacus.PrivacyEngine``: Opacus without a crop geometry,
patch-level accounting (Theorem 2) with one.

A user changes the import.  Without ``crop=`` / ``private_region=`` (and without a
:class:`~patchdp_opacus.plugin.loader.CropDPDataLoader`) every call behaves exactly as Opacus'
(any accountant, Poisson sampling by default, Opacus' data loader and epsilon: record-level
add/remove).  With them the engine switches to the patch-level mode::

    from patchdp_opacus import PrivacyEngine
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader,       # no random crop in it
        target_epsilon=8.0, target_delta=1 / N, epochs=100, max_grad_norm=2.0,
        crop=(505, 505), padding=(0, 0), private_region=(10, 10))
    ...
    engine.get_epsilon(delta)                    # patch level
    engine.get_epsilon(delta, level="record")    # record-level baseline, same steps

``crop=`` may also be a loader-owned resampling transform
(``patchdp_opacus.privacy.RandomScaleCrop((505, 505), scale_range=(0.5, 2.0))``,
``RandomResizedCrop``, ``Resize``): the loader then draws each sample's scale / box and
origin and resamples it, and the accountant's ``p`` is that transform's footprint ``p``
(the private region in stored-image pixels).

What the patch-level mode guarantees on top of Opacus (:meth:`PrivacyEngine._make_private_patch`
is the one place that builds it):

* the data loader is a :class:`~patchdp_opacus.plugin.loader.CropDPDataLoader`: fixed-size
  batches of exactly ``B`` drawn without replacement every step from OS entropy, the random
  crop (or resampling transform) applied by the loader itself from the same
  :class:`~patchdp_opacus.privacy.spec.PatchPrivacySpec` the accountant uses, and the dataset's
  transforms and ``collate_fn`` inspected;
* the accountant (``patch_pld``) records ``(z, q = B / N, steps)`` once per logical step and
  applies ``p`` once; ``optimizer.expected_batch_size`` is ``B`` exactly;
* every noisy step releases exactly one logical batch, one gradient row per sample, from a
  model without sample-mixing layers (:mod:`patchdp_opacus.plugin.integrity`);
* the noise comes from a generator seeded with OS entropy (``secure_mode=True``: reseeded
  every step, floating-point attack mitigation), never from ``torch.manual_seed``;
* refused, each with its reason: Poisson sampling, an explicitly chosen Opacus accountant,
  adaptive clipping, group privacy inside the accountant, manual accumulation.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import opacus
import torch
from opacus.accountants import create_accountant
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.optimizers import get_optimizer_class
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from patchdp_opacus.plugin.accountant import LEVELS, PatchPLDAccountant, amplification
from patchdp_opacus.plugin.ghost import CheckedDPLoss, pop_clipped_rows
from patchdp_opacus.plugin.integrity import (
    ModuleIntegrity,
    NoiseSource,
    SampleMixingError,
    mixing_modules,
    rows_from_grad_samples,
    with_mixins,
)
from patchdp_opacus.plugin.loader import CropDPDataLoader
from patchdp_opacus.privacy import accounting

logger = logging.getLogger(__name__)

PATCH_ACCOUNTANT = PatchPLDAccountant.mechanism()
#: Accountant of the Opacus (record-level) mode when none is chosen: Opacus' default.
OPACUS_DEFAULT_ACCOUNTANT = "prv"

#: make_private's arguments that only exist in the patch-level mode, with their defaults.
GEOMETRY_ARGS = {"crop": None, "padding": None, "pad_if_needed": False, "private_region": None,
                 "image_sizes": None, "group_size": 1, "allow_unchecked_transforms": False,
                 "seed": None, "post_crop_transform": None, "gaussian_augmentation": None,
                 "augmentation_seed": None}

_POISSON_REFUSAL = (
    "poisson_sampling=True cannot carry a patch-level claim: Theorem 2 is proven for fixed-size "
    "batches sampled uniformly without replacement, which the crop-aware loader provides. Leave "
    "poisson_sampling unset (fixed-size in the patch-level mode), or drop crop=/private_region= "
    "for Opacus' record-level accounting with Poisson sampling.")


def _fast_modes() -> dict:
    """Per-sample clipping modes of :mod:`patchdp_opacus.fast`, selectable by
    ``grad_sample_mode`` beside Opacus' own ("hooks", "functorch", "ew", "ghost")."""
    try:
        from patchdp_opacus.fast import FAST_MODES
    except ImportError:
        return {}
    return FAST_MODES


def _split_geometry(kwargs: dict) -> dict:
    """Pop the patch-level arguments out of ``kwargs``; returns those that were given."""
    return {k: kwargs.pop(k) for k in GEOMETRY_ARGS if k in kwargs}


def is_patch_level(data_loader, geometry: dict) -> bool:
    """The one rule that decides the mode of a ``make_private`` call: a crop geometry and a
    private region, or a :class:`CropDPDataLoader`, switch on the patch-level mode."""
    given = {k for k, v in geometry.items() if v != GEOMETRY_ARGS[k]}
    if isinstance(data_loader, CropDPDataLoader) or {"crop", "private_region"} & given:
        return True
    if given:
        raise ValueError(
            f"{sorted(given)} describe the patch-level claim and need crop=(h, w) and "
            f"private_region=(k_h, k_w) (or a CropDPDataLoader); without them the engine is "
            f"plain Opacus (record-level add/remove accounting)")
    return False


class PrivacyEngine(opacus.PrivacyEngine):
    """``opacus.PrivacyEngine`` plus the patch-level mode (see the module docstring).

    Args:
        accountant: ``None`` (default) picks the accountant per mode: ``"patch_pld"`` when a
            crop geometry is given, Opacus' default ``"prv"`` otherwise.  An Opacus accountant
            (``"prv"``, ``"rdp"``, ``"gdp"``) chosen explicitly is used without a geometry and
            refused with one (it models Poisson sampling under add/remove, a different mechanism
            and relation); ``"patch_pld"`` needs a geometry.
        secure_mode: OS entropy for every random draw DP relies on.  Patch-level mode: batch
            indices and crop origins from :mod:`secrets`, noise from a generator reseeded from
            the OS at every step with Opacus' floating-point attack mitigation.  Opacus mode:
            the same noise, and Opacus' Poisson sampler seeded from the OS.  Opacus' own secure
            mode needs torchcsprng, which does not build for current torch; this one does not.
    """

    def __init__(self, *, accountant: Optional[str] = None, secure_mode: bool = False):
        self.requested_accountant = accountant
        initial = accountant or OPACUS_DEFAULT_ACCOUNTANT
        if secure_mode:
            with warnings.catch_warnings():  # Opacus warns that its secure RNG is off
                warnings.filterwarnings("ignore", message="Secure RNG turned off")
                super().__init__(accountant=initial, secure_mode=False)
        else:
            super().__init__(accountant=initial, secure_mode=False)
        self.secure_mode = bool(secure_mode)
        if self.secure_mode:  # read by Opacus' Poisson loader in the Opacus mode
            from patchdp_opacus.plugin.sampler import os_seeded_generator

            self.secure_rng = os_seeded_generator()
        self.patch_level = False
        #: mode of the first make_private (True: patch level); later calls must keep it
        self.made_private_in: Optional[bool] = None
        self.data_loader: Optional[CropDPDataLoader] = None
        self.max_grad_norm = None
        self.noise_multiplier = None
        self.noise_source: Optional[NoiseSource] = None
        self.integrity: Optional[ModuleIntegrity] = None
        self._fast_options: dict = {}
        self.target: Optional[dict] = None  # set by make_private_with_epsilon
        self._budget_warned = False

    @property
    def secure_sampling(self) -> bool:
        return self.secure_mode

    # -- the mode ---------------------------------------------------------------------------
    def _switch_accountant(self, patch_level: bool) -> None:
        """Make the accountant fit the mode; never mixes steps of the two relations."""
        wanted_patch = patch_level
        requested = self.requested_accountant
        if patch_level and requested not in (None, PATCH_ACCOUNTANT):
            raise ValueError(
                f"accountant={requested!r} with a crop geometry: Opacus' {requested!r} accountant "
                f"models Poisson sampling under add/remove of a record, not the patch-level "
                f"substitution relation with fixed-size batches; use PrivacyEngine() (or "
                f"accountant='{PATCH_ACCOUNTANT}') for patch-level accounting, or drop crop=/"
                f"private_region= to keep {requested!r}")
        if not patch_level and requested == PATCH_ACCOUNTANT:
            raise ValueError(
                f"accountant='{PATCH_ACCOUNTANT}' needs a crop geometry: pass crop=(h, w) and "
                f"private_region=(k_h, k_w) (or a CropDPDataLoader), or choose an Opacus "
                f"accountant for record-level accounting")
        is_patch = isinstance(self.accountant, PatchPLDAccountant)
        if self.made_private_in is not None and self.made_private_in != patch_level:
            raise ValueError(
                f"this engine already made a model private in the "
                f"{'patch-level' if self.made_private_in else 'Opacus record-level'} mode; its "
                f"optimizer keeps stepping this engine's accountant, which composes one "
                f"relation. Use a new PrivacyEngine for a model in the other mode")
        if is_patch == wanted_patch:
            self.patch_level = patch_level
            return
        if len(self.accountant) > 0:
            raise ValueError(
                f"this engine already accounted {len(self.accountant)} steps in the "
                f"{'patch-level' if is_patch else 'Opacus record-level'} mode; its accountant "
                f"cannot compose them with the other relation. Use a new PrivacyEngine")
        self.accountant = create_accountant(
            PATCH_ACCOUNTANT if patch_level else (requested or OPACUS_DEFAULT_ACCOUNTANT))
        self.patch_level = patch_level

    def _reset_run_state(self) -> None:
        self.data_loader = None
        self.noise_source = None
        self.target = None
        self._budget_warned = False

    # -- data ---------------------------------------------------------------------------------
    def _crop_loader(self, data_loader, distributed: bool, **geometry) -> CropDPDataLoader:
        geometry = {**GEOMETRY_ARGS, **geometry}
        if isinstance(data_loader, CropDPDataLoader):
            given = sorted(k for k, v in geometry.items() if v != GEOMETRY_ARGS[k])
            if given:
                raise ValueError(
                    f"data_loader is already a CropDPDataLoader with its own crop, private "
                    f"region and sampling; do not pass {given} again")
            if distributed != bool(getattr(data_loader, "distributed", False)):
                raise ValueError(
                    f"the model is {'' if distributed else 'not '}distributed but the "
                    f"CropDPDataLoader was built with distributed={not distributed}")
            return data_loader
        if geometry["crop"] is None or geometry["private_region"] is None:
            raise ValueError(
                "patch-level accounting needs the crop geometry and the private region: pass "
                "crop=(h, w) and private_region=(k_h, k_w) (or a shape / boolean mask), or a "
                "CropDPDataLoader")
        return CropDPDataLoader.from_data_loader(
            data_loader, secure=self.secure_mode, distributed=distributed, **geometry)

    # -- fast per-sample clipping modes (patchdp_opacus.fast), next to Opacus' own -------------
    def _prepare_model(self, module, *, grad_sample_mode: str = "hooks", **kwargs):
        mode = _fast_modes().get(grad_sample_mode)
        if mode is None:
            return super()._prepare_model(module, grad_sample_mode=grad_sample_mode, **kwargs)
        if not kwargs.get("wrap_model", True):
            raise ValueError(f"grad_sample_mode={grad_sample_mode!r} needs wrap_model=True")
        self.validate(module=module, optimizer=None, data_loader=None)
        return mode.wrap_model(module, batch_first=kwargs.get("batch_first", True),
                               loss_reduction=kwargs.get("loss_reduction", "mean"),
                               max_grad_norm=kwargs.get("max_grad_norm", 1.0),
                               **self._fast_options)

    def _optimizer_class(self, grad_sample_mode: str, clipping: str, distributed: bool) -> type:
        mode = _fast_modes().get(grad_sample_mode)
        if mode is None:
            return get_optimizer_class(clipping=clipping, distributed=distributed,
                                       grad_sample_mode=grad_sample_mode)
        optimizer_cls = mode.distributed_optimizer_cls if distributed else mode.optimizer_cls
        if optimizer_cls is None or clipping != "flat":
            raise ValueError(f"grad_sample_mode={grad_sample_mode!r} supports flat clipping"
                             f"{'' if mode.distributed_optimizer_cls else ' in one process'} "
                             f"only; use grad_sample_mode='hooks' for distributed={distributed}, "
                             f"clipping={clipping!r}")
        return optimizer_cls

    def _prepare_optimizer(self, *, optimizer, noise_multiplier, max_grad_norm,
                           expected_batch_size, loss_reduction: str = "mean",
                           distributed: bool = False, clipping: str = "flat",
                           noise_generator=None, grad_sample_mode: str = "hooks",
                           guard: bool = False, noise_source: Optional[NoiseSource] = None,
                           **kwargs):
        """Build the DP optimizer: Opacus' class for the mode (or a fast mode's), with the
        logical-batch guard (patch-level mode) and/or an OS noise source mixed in."""
        if isinstance(optimizer, opacus.optimizers.DPOptimizer):
            optimizer = optimizer.original_optimizer
        base = self._optimizer_class(grad_sample_mode, clipping, distributed)
        if noise_source is None and self.secure_mode:  # Opacus mode, our secure noise
            noise_source = NoiseSource("secure")
        cls = with_mixins(base, guard) if (guard or noise_source is not None) else base
        dp_optimizer = cls(optimizer=optimizer, noise_multiplier=noise_multiplier,
                           max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                           loss_reduction=loss_reduction, generator=noise_generator,
                           secure_mode=False, **kwargs)
        if noise_source is not None:
            dp_optimizer.set_noise_source(noise_source)
            self.noise_source = noise_source
        return dp_optimizer

    # -- the Opacus entry points ----------------------------------------------------------------
    def make_private(self, *, module, optimizer, data_loader, noise_multiplier, max_grad_norm,
                     criterion=nn.CrossEntropyLoss(), poisson_sampling: Optional[bool] = None,
                     fast_options: Optional[dict] = None, **kwargs):
        """Opacus' ``make_private``; with ``crop=`` and ``private_region=`` (plus ``padding``,
        ``pad_if_needed``, ``image_sizes``, ``group_size``, ``allow_unchecked_transforms``,
        ``seed``, ``post_crop_transform``, ``gaussian_augmentation``, ``augmentation_seed``: see
        :meth:`CropDPDataLoader.from_data_loader`) or a CropDPDataLoader, the patch-level mode.

        ``noise_multiplier`` z: noise std = z * max_grad_norm.  ``fast_options``: options of a
        :mod:`patchdp_opacus.fast` mode (e.g. ``{"storage": "recompute"}`` for
        ``grad_sample_mode="bk"``).  ``poisson_sampling``: default ``True`` in the Opacus mode
        (as Opacus), fixed-size batches in the patch-level mode.  Returns
        ``(module, optimizer, data_loader)``, or ``(module, optimizer, criterion, data_loader)``
        for ``grad_sample_mode="ghost"`` as Opacus does."""
        geometry = _split_geometry(kwargs)
        patch_level = is_patch_level(data_loader, geometry)
        if fast_options and kwargs.get("grad_sample_mode", "hooks") not in _fast_modes():
            raise ValueError(f"fast_options apply to grad_sample_mode in {sorted(_fast_modes())}")
        self._switch_accountant(patch_level)
        self._reset_run_state()
        self._fast_options = dict(fast_options or {})
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        if patch_level:
            if poisson_sampling:
                raise ValueError(_POISSON_REFUSAL)
            out = self._make_private_patch(
                module=module, optimizer=optimizer, data_loader=data_loader,
                noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                criterion=criterion, geometry=geometry, **kwargs)
            self.made_private_in = True
            return out
        self.made_private_in = False
        logger.info("record-level DP-SGD with Opacus' '%s' accountant (add/remove of one record, "
                    "Poisson sampling unless poisson_sampling=False); for patch-level "
                    "accounting pass crop=(h, w) and private_region=(k_h, k_w)",
                    self.accountant.mechanism())
        return super().make_private(
            module=module, optimizer=optimizer, data_loader=data_loader, criterion=criterion,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            poisson_sampling=True if poisson_sampling is None else poisson_sampling, **kwargs)

    def _make_private_patch(self, *, module, optimizer, data_loader, noise_multiplier,
                            max_grad_norm, criterion, geometry: dict, batch_first: bool = True,
                            loss_reduction: str = "mean", clipping: str = "flat",
                            noise_generator=None, grad_sample_mode: str = "hooks",
                            wrap_model: bool = True, **kwargs):
        """The patch-level mode, in order: refusals, the crop-aware loader and its spec, the
        accountant, the per-sample model, the guarded optimizer with its noise source, the
        accountant hook (see the module docstring)."""
        if clipping == "adaptive":
            raise ValueError(
                "clipping='adaptive' releases a noisy count of clipped samples at every step, a "
                "second mechanism the Theorem-2 accountant does not cover; use clipping='flat' "
                "(or 'per_layer', whose noise std is z times the total clip norm)")
        if grad_sample_mode == "ghost_fsdp":
            raise ValueError("grad_sample_mode='ghost_fsdp' is not supported with a patch-level "
                             "claim; use 'hooks', 'ghost' or 'bk' with DPDDP")
        if noise_generator is not None and self.secure_mode:
            raise ValueError("noise_generator= with secure_mode=True: secure mode reseeds the "
                             "noise from the OS at every step; drop one of them")
        model_parameters = set(module.parameters())
        in_optimizer = {p for group in optimizer.param_groups for p in group["params"]}
        if in_optimizer - model_parameters:
            raise ValueError("Module parameters are different than optimizer Parameters")
        outside = [n for n, p in module.named_parameters()
                   if p.requires_grad and p not in in_optimizer]
        if outside:
            raise ValueError(
                f"{len(outside)} trainable parameter(s) of the model are not in the DP optimizer "
                f"(e.g. {outside[:3]}): their ordinary gradients are neither clipped nor noised, "
                f"and any other optimizer or update that uses them releases private data. "
                f"Freeze them (requires_grad=False) or give them to the optimizer passed to "
                f"make_private")
        mixing = mixing_modules(module)
        if mixing:
            raise SampleMixingError(
                f"module {mixing[0][0]!r} mixes samples in training mode: {mixing[0][1]}; use "
                f"patchdp_opacus.plugin.compat.make_private_compatible(model, norm='frozen' or "
                f"'group'), or put it in eval mode and keep it there")
        distributed = isinstance(module, (DPDDP, DDP))
        loader = self._crop_loader(data_loader, distributed, **geometry)
        if loader.spec.group_size != 1:
            raise ValueError(
                "group_size > 1 is evaluated with group privacy at report time "
                "(patchdp_opacus.privacy.group_epsilon); the engine's accountant protects one "
                "region per image — protect several regions as one Union mask instead")
        self.accountant.set_spec(loader.spec)
        if loader.inclusion_probability >= 1.0:
            logger.warning(accounting.NO_AMPLIFICATION_WARNING)
            warnings.warn(accounting.NO_AMPLIFICATION_WARNING, stacklevel=3)
        wrapped = self._prepare_model(module, batch_first=batch_first,
                                      max_grad_norm=max_grad_norm, loss_reduction=loss_reduction,
                                      grad_sample_mode=grad_sample_mode, wrap_model=wrap_model)
        world = torch.distributed.get_world_size() if distributed else 1
        local_batch = loader.batch_size // world  # fixed-size batches: exact, not int(N / len)
        noise = NoiseSource("user", noise_generator) if noise_generator is not None else \
            NoiseSource("secure" if self.secure_mode else "os")
        dp_optimizer = self._prepare_optimizer(
            optimizer=optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=local_batch, loss_reduction=loss_reduction,
            distributed=distributed, clipping=clipping, grad_sample_mode=grad_sample_mode,
            guard=True, noise_source=noise, **kwargs)
        # hooks on the module the user holds (reached through the wrapper and directly)
        self.integrity = ModuleIntegrity(module.module if distributed else module)
        self.integrity.watch_optimizer(dp_optimizer.original_optimizer)
        self.accountant.reading_checks[:] = [self.integrity.check_unchanged]
        dp_optimizer.attach_guard(
            batch_size=local_batch, sampler=loader.batch_sampler,
            rows=self._rows_function(grad_sample_mode, wrapped), integrity=self.integrity,
            prefetch=loader.num_workers * (loader.prefetch_factor or 0))
        self.target = self.__dict__.pop("_pending_target", None)
        account = self.accountant.get_optimizer_hook_fn(sample_rate=loader.sample_rate)

        def step_hook(optim):
            account(optim)
            self._check_budget()

        dp_optimizer.attach_accounting_hook(step_hook)
        self.data_loader = loader
        logger.info("patch-level DP-SGD: q=%.6g p=%.6g (%s) w=q*p=%.6g z=%.6g C=%s; noise: %s; "
                    "sampling: %s", loader.sample_rate, loader.inclusion_probability,
                    loader.spec.inclusion.fraction, loader.effective_sample_rate,
                    noise_multiplier, max_grad_norm, noise.describe(), loader.sampling_source)
        if "ghost" in grad_sample_mode:
            return wrapped, dp_optimizer, CheckedDPLoss(wrapped, dp_optimizer, criterion,
                                                        loss_reduction), loader
        return wrapped, dp_optimizer, loader

    @staticmethod
    def _rows_function(grad_sample_mode: str, wrapped):
        """Per-sample gradient rows of the chunk an optimizer step just clipped, per mode."""
        if grad_sample_mode in _fast_modes():
            return lambda optim: int(optim.per_sample_norms.numel())
        if "ghost" in grad_sample_mode:
            return pop_clipped_rows
        return rows_from_grad_samples

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon,
                                  target_delta, max_grad_norm, epochs=None, steps=None,
                                  level: Optional[str] = None,
                                  criterion=nn.CrossEntropyLoss(),
                                  poisson_sampling: Optional[bool] = None, **kwargs):
        """Calibrate z so that ``epsilon <= target_epsilon`` after ``epochs`` epochs (or
        ``steps`` steps), then :meth:`make_private`.

        Patch-level mode: steps are logical steps, ``epochs * len(data_loader)`` with
        ``len = round(N / B)``; ``level="record"`` calibrates for the record-level baseline
        (p = 1) instead -- the same training, a different claim; ``level=
        "gaussian_augmentation"`` for the Gaussian-augmentation baseline (``w = q * TV``; needs
        ``gaussian_augmentation=GaussianAugmentation(sigma_aug, channels)``, whose noise the
        loader then adds).  Opacus mode: Opacus' calibration for its accountant (``level`` must
        be left unset)."""
        geometry = _split_geometry(kwargs)
        if (epochs is None) == (steps is None):
            raise ValueError("pass exactly one of epochs= or steps=")
        if not is_patch_level(data_loader, geometry):
            if level not in (None, "record"):
                raise ValueError(f"level={level!r} needs a crop geometry (crop=, "
                                 f"private_region=); without one the engine is Opacus")
            if steps is None:
                return super().make_private_with_epsilon(
                    module=module, optimizer=optimizer, data_loader=data_loader,
                    criterion=criterion, target_epsilon=target_epsilon,
                    target_delta=target_delta, epochs=epochs, max_grad_norm=max_grad_norm,
                    poisson_sampling=True if poisson_sampling is None else poisson_sampling,
                    **kwargs)
            self._switch_accountant(False)
            z = opacus.accountants.utils.get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=target_delta,
                sample_rate=1 / len(data_loader), steps=int(steps),
                accountant=self.accountant.mechanism())
            return self.make_private(module=module, optimizer=optimizer, data_loader=data_loader,
                                     criterion=criterion, noise_multiplier=z,
                                     max_grad_norm=max_grad_norm,
                                     poisson_sampling=poisson_sampling, **kwargs)
        level = "patch" if level is None else level
        if poisson_sampling:
            raise ValueError(_POISSON_REFUSAL)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        self._switch_accountant(True)
        if len(self.accountant) > 0:
            warnings.warn("make_private_with_epsilon after steps were already accounted: the "
                          "calibrated noise assumes a fresh budget, the total epsilon will be "
                          "higher", stacklevel=2)
        loader = self._crop_loader(data_loader, isinstance(module, (DPDDP, DDP)), **geometry)
        total_steps = int(steps) if steps is not None else int(round(epochs * len(loader)))
        factor = amplification(loader.spec, level)  # p, 1 or TV(sigma_aug): w = q * factor
        z = accounting.calibrate_noise(target_epsilon, target_delta, loader.sample_rate, factor,
                                       total_steps, discretization=self.accountant.discretization)
        logger.info("calibrated z=%.6g for %s-level eps<=%g at delta=%g over %d steps", z, level,
                    target_epsilon, target_delta, total_steps)
        self._pending_target = {"epsilon": target_epsilon, "delta": target_delta,
                                "steps": total_steps, "level": level, "noise_multiplier": z}
        return self.make_private(
            module=module, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=z, max_grad_norm=max_grad_norm, **kwargs)

    def _check_budget(self) -> None:
        """Warn once when more logical steps are taken than the noise was calibrated for (the
        run's epsilon then exceeds the target; a per-step epsilon evaluation would be too slow
        for a hook, the step count is exact)."""
        target = self.target
        if target is None or self._budget_warned or len(self.accountant) <= target["steps"]:
            return
        self._budget_warned = True
        msg = (f"privacy budget exhausted: step {len(self.accountant)} exceeds the "
               f"{target['steps']} logical steps the noise was calibrated for "
               f"({target['level']}-level epsilon <= {target['epsilon']} at delta "
               f"{target['delta']}); from here epsilon exceeds the target. Stop training, or "
               f"call make_private_with_epsilon with the number of epochs you will run.")
        logger.warning(msg)
        warnings.warn(msg, stacklevel=3)

    # -- reading the claim ----------------------------------------------------------------------
    def get_epsilon(self, delta: float, level: Optional[str] = None) -> float:
        """Epsilon of the steps taken so far.  Patch-level mode: patch level (default) or
        ``level="record"`` (p = 1, same steps), refused when the model changed outside the DP
        step since the last one (the epsilon would not cover the model).  Opacus mode: Opacus'
        epsilon (record-level add/remove); ``level="patch"`` raises there."""
        if not isinstance(self.accountant, PatchPLDAccountant):
            if level == "patch":
                raise ValueError(
                    "level='patch' needs a patch-level claim: this engine runs in the Opacus "
                    "mode (no crop geometry was given to make_private), whose accountant "
                    f"'{self.accountant.mechanism()}' is record-level add/remove. Pass crop= and "
                    "private_region= to make_private for patch-level accounting")
            return self.accountant.get_epsilon(delta)
        return self.accountant.get_epsilon(delta, level=level or "patch")

    def privacy_report(self, delta: float) -> dict:
        """Everything a reader needs to check the claim (JSON-able).  ``history`` lists every
        ``(noise_multiplier z, sample_rate q, steps)`` segment actually run."""
        if self.integrity is not None:
            self.integrity.check_unchanged()
        acc = self.accountant
        history = [list(h) for h in acc.history]
        report = {
            "history": history,
            "noise_multipliers_used": sorted({h[0] for h in history}),
            "steps": len(acc),
            "delta": delta,
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "secure_mode": self.secure_mode,
            "noise_source": self.noise_source.describe() if self.noise_source else
            "Opacus default: torch's global generator (reproducible from torch.manual_seed)",
        }
        if not isinstance(acc, PatchPLDAccountant):
            report.update(relation="record-level add/remove (Opacus)",
                          sampling="Opacus data loader", accountant=acc.mechanism(),
                          epsilon_record_add_remove=acc.get_epsilon(delta) if len(acc) else 0.0)
            return report
        spec = acc.spec
        report.update(
            relation="patch-level substitution" if spec else "record-level substitution",
            sampling="fixed-size batches without replacement", accountant=acc.mechanism(),
            secure_sampling=self.secure_mode,
            epsilon_patch=acc.get_epsilon(delta, level="patch") if spec else None,
            epsilon_record=acc.get_epsilon(delta, level="record"),
            opacus_orientation={
                "epsilon": accounting.add_remove_poisson_epsilon(acc.history, delta)
                if len(acc) else 0.0,
                "relation": accounting.OPACUS_RELATION,
                "note": "for orientation only: a different neighbouring relation and sampling "
                        "scheme than epsilon_patch / epsilon_record"})
        if spec is not None:
            report["geometry"] = spec.to_dict()
            report["geometry_description"] = spec.describe_geometry()
        if spec is not None and spec.augmentation is not None:
            report.update(
                epsilon_gaussian_augmentation=acc.get_epsilon(delta,
                                                              level="gaussian_augmentation"),
                augmentation=spec.augmentation.describe(),
                augmentation_tv=spec.augmentation_tv)
        if self.data_loader is not None:
            report.update(batch_size=self.data_loader.batch_size,
                          dataset_size=len(self.data_loader.dataset),
                          sample_rate=self.data_loader.sample_rate,
                          effective_sample_rate=self.data_loader.effective_sample_rate,
                          sampling_source=self.data_loader.sampling_source)
            if spec is not None and spec.augmentation is not None:
                report.update(
                    effective_sample_rate_gaussian_augmentation=self.data_loader.sample_rate
                    * spec.augmentation_tv,
                    augmentation_source=self.data_loader.augmentation_source)
        return report

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, *, path, module, optimizer=None, checkpoint_dict=None, **kwargs):
        """Opacus' checkpoint (module, optimizer, accountant with the geometry).  Checkpoints
        hold the model before its release: private artefacts.  No random-generator state of
        the noise or of secret sampling is stored; a seeded loader's state is (it is known to
        whoever knows the seed), so that a resumed run draws the batches it would have."""
        if self.integrity is not None:
            self.integrity.check_unchanged()  # the saved model is the one the claim covers
        checkpoint_dict = dict(checkpoint_dict or {})
        loader = self.data_loader
        sampler = getattr(loader, "batch_sampler", None)
        gen = getattr(sampler, "generator", None)
        if isinstance(gen, torch.Generator) and getattr(loader, "_seeded", False):
            checkpoint_dict["patchdp_sampler_rng_state"] = gen.get_state()
        noise = getattr(sampler, "noise_generator", None)  # Gaussian augmentation's seeds
        if isinstance(noise, torch.Generator) and getattr(loader, "_augmentation_seeded", False):
            checkpoint_dict["patchdp_augmentation_rng_state"] = noise.get_state()
        return super().save_checkpoint(path=path, module=module, optimizer=optimizer,
                                       checkpoint_dict=checkpoint_dict, **kwargs)

    def load_checkpoint(self, *, path, module, optimizer=None, **kwargs):
        """Load module/optimizer/accountant; refuses a checkpoint of another geometry."""
        checkpoint = super().load_checkpoint(path=path, module=module, optimizer=optimizer,
                                             **kwargs)
        if self.integrity is not None:
            self.integrity.take_reference()  # the loaded weights are the new reference
        sampler = getattr(self.data_loader, "batch_sampler", None)
        for key, attribute, seeded in (("patchdp_sampler_rng_state", "generator", "_seeded"),
                                       ("patchdp_augmentation_rng_state", "noise_generator",
                                        "_augmentation_seeded")):
            state, gen = checkpoint.get(key), getattr(sampler, attribute, None)
            if state is not None and isinstance(gen, torch.Generator) \
                    and getattr(self.data_loader, seeded, False):
                gen.set_state(state)
        return checkpoint

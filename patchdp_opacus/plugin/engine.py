"""Drop-in replacement for ``opacus.PrivacyEngine`` with patch-level accounting (Theorem 2).

A user changes the import and describes the crop and the private region::

    from patchdp_opacus import PrivacyEngine
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader,       # no random crop in it
        target_epsilon=8.0, target_delta=1 / N, epochs=100, max_grad_norm=2.0,
        crop=(505, 505), padding=(0, 0), private_region=(10, 10))
    ...
    engine.get_epsilon(delta)                    # patch level
    engine.get_epsilon(delta, level="record")    # record-level baseline, same steps

What the engine guarantees on top of Opacus:

* the data loader is a :class:`~patchdp_opacus.plugin.loader.CropDPDataLoader`: fixed-size
  batches of exactly ``B`` drawn without replacement every step, and the random crop applied by
  the loader itself from the same :class:`~patchdp_opacus.privacy.spec.PatchPrivacySpec` the
  accountant uses;
* the accountant records ``(z, q = B / N, steps)`` once per logical step and applies ``p`` once;
* ``optimizer.expected_batch_size`` is ``B`` exactly (Opacus would derive ``int(N / len)``);
* Poisson sampling with a patch-level claim is refused (Theorem 2 is proven for fixed-size
  batches without replacement).  Record-level Poisson accounting: use ``opacus.PrivacyEngine``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import opacus
import torch
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.nn.parallel import DistributedDataParallel as DDP

from patchdp_opacus.plugin.accountant import LEVELS, PatchPLDAccountant
from patchdp_opacus.plugin.loader import CropDPDataLoader
from patchdp_opacus.privacy import accounting

logger = logging.getLogger(__name__)

#: make_private's arguments that describe the crop, the private region and the sampling seed.
_GEOMETRY_ARGS = ("crop", "padding", "pad_if_needed", "private_region", "image_sizes",
                  "group_size", "allow_unchecked_transforms", "seed")

_POISSON_REFUSAL = (
    "poisson_sampling=True cannot carry a patch-level claim: Theorem 2 is proven for fixed-size "
    "batches sampled uniformly without replacement, which the crop-aware loader provides. Leave "
    "poisson_sampling=False (the default here), or use opacus.PrivacyEngine for record-level "
    "accounting with Poisson sampling.")


def _fast_modes() -> dict:
    """Per-sample clipping modes of :mod:`patchdp_opacus.fast`, selectable by
    ``grad_sample_mode`` beside Opacus' own ("hooks", "functorch", "ew", "ghost")."""
    try:
        from patchdp_opacus.fast import FAST_MODES
    except ImportError:
        return {}
    return FAST_MODES


class PrivacyEngine(opacus.PrivacyEngine):
    """``opacus.PrivacyEngine`` with the Theorem-2 accountant and the crop-aware loader.

    Args:
        accountant: only ``"patch_pld"`` (Opacus' own accountants model Poisson sampling under
            add/remove, a different mechanism and relation).
        secure_mode: draw batch indices and crop origins from the OS CSPRNG (``secrets``).
            This covers sampling and cropping only: Opacus' Gaussian noise still comes from
            torch's generator (Opacus' own secure mode needs torchcsprng, which does not build
            for current torch).
    """

    def __init__(self, *, accountant: str = "patch_pld", secure_mode: bool = False):
        if accountant != PatchPLDAccountant.mechanism():
            raise ValueError(
                f"accountant={accountant!r}: patchdp_opacus.PrivacyEngine accounts with "
                f"'{PatchPLDAccountant.mechanism()}' (Theorem 2, fixed-size batches). Opacus' "
                f"'{accountant}' accountant assumes Poisson sampling; use opacus.PrivacyEngine "
                f"for it.")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            super().__init__(accountant=accountant, secure_mode=False)
        self.secure_sampling = bool(secure_mode)
        self.data_loader: Optional[CropDPDataLoader] = None
        self.max_grad_norm = None
        self.noise_multiplier = None
        self._fast_options: dict = {}
        self.target: Optional[dict] = None  # set by make_private_with_epsilon
        self._budget_warned = False

    # -- data ---------------------------------------------------------------------------------
    def _crop_loader(self, data_loader, module, *, crop=None, padding=(0, 0),
                     pad_if_needed=False, private_region=None, image_sizes=None, group_size=1,
                     allow_unchecked_transforms=False, seed=None) -> CropDPDataLoader:
        distributed = isinstance(module, (DPDDP, DDP))
        geometry_given = crop is not None or private_region is not None
        if isinstance(data_loader, CropDPDataLoader):
            if geometry_given:
                raise ValueError(
                    "data_loader is already a CropDPDataLoader with its own crop and private "
                    "region; do not pass crop=/private_region= again")
            if distributed != bool(getattr(data_loader, "distributed", False)):
                raise ValueError(
                    f"the model is {'' if distributed else 'not '}distributed but the "
                    f"CropDPDataLoader was built with distributed={not distributed}")
            return data_loader
        if crop is None or private_region is None:
            raise ValueError(
                "patch-level accounting needs the crop geometry and the private region: pass "
                "crop=(h, w) and private_region=(k_h, k_w) (or a shape / boolean mask), or a "
                "CropDPDataLoader")
        return CropDPDataLoader.from_data_loader(
            data_loader, crop=crop, padding=padding, pad_if_needed=pad_if_needed,
            private_region=private_region, image_sizes=image_sizes, group_size=group_size,
            allow_unchecked_transforms=allow_unchecked_transforms, seed=seed,
            secure=self.secure_sampling, distributed=distributed)

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

    def _prepare_optimizer(self, *, optimizer, grad_sample_mode: str = "hooks",
                           distributed: bool = False, clipping: str = "flat",
                           noise_generator=None, **kwargs):
        mode = _fast_modes().get(grad_sample_mode)
        if mode is None:
            return super()._prepare_optimizer(
                optimizer=optimizer, grad_sample_mode=grad_sample_mode, distributed=distributed,
                clipping=clipping, noise_generator=noise_generator, **kwargs)
        optimizer_cls = mode.distributed_optimizer_cls if distributed else mode.optimizer_cls
        if optimizer_cls is None or clipping != "flat":
            raise ValueError(f"grad_sample_mode={grad_sample_mode!r} supports flat clipping"
                             f"{'' if mode.distributed_optimizer_cls else ' in one process'} "
                             f"only; use grad_sample_mode='hooks' for distributed={distributed}, "
                             f"clipping={clipping!r}")
        if isinstance(optimizer, opacus.optimizers.DPOptimizer):
            optimizer = optimizer.original_optimizer
        return optimizer_cls(optimizer=optimizer, generator=noise_generator, secure_mode=False,
                             **kwargs)

    # -- the Opacus entry points ----------------------------------------------------------------
    def make_private(self, *, module, optimizer, data_loader, noise_multiplier, max_grad_norm,
                     criterion=torch.nn.CrossEntropyLoss(), crop=None, padding=(0, 0),
                     pad_if_needed: bool = False, private_region=None, image_sizes=None,
                     group_size: int = 1, allow_unchecked_transforms: bool = False,
                     seed: Optional[int] = None, poisson_sampling: bool = False,
                     fast_options: Optional[dict] = None, **kwargs):
        """Opacus' ``make_private`` plus the crop/patch description (see the module doc).

        ``noise_multiplier`` z: noise std = z * max_grad_norm.  ``fast_options``: options of a
        :mod:`patchdp_opacus.fast` mode (e.g. ``{"storage": "recompute"}`` for
        ``grad_sample_mode="bk"``).  Returns
        ``(module, optimizer, data_loader)``, or ``(module, optimizer, criterion, data_loader)``
        for ``grad_sample_mode="ghost"`` as Opacus does."""
        if poisson_sampling:
            raise ValueError(_POISSON_REFUSAL)
        if kwargs.get("clipping", "flat") == "adaptive":
            raise ValueError(
                "clipping='adaptive' releases a noisy count of clipped samples at every step, a "
                "second mechanism the Theorem-2 accountant does not cover; use clipping='flat' "
                "(or 'per_layer', whose noise std is z times the total clip norm)")
        if fast_options and kwargs.get("grad_sample_mode", "hooks") not in _fast_modes():
            raise ValueError(f"fast_options apply to grad_sample_mode in {sorted(_fast_modes())}")
        self._fast_options = dict(fast_options or {})
        distributed = isinstance(module, (DPDDP, DDP))
        loader = self._crop_loader(
            data_loader, module, crop=crop, padding=padding, pad_if_needed=pad_if_needed,
            private_region=private_region, image_sizes=image_sizes, group_size=group_size,
            allow_unchecked_transforms=allow_unchecked_transforms, seed=seed)
        if loader.spec.group_size != 1:
            raise ValueError(
                "group_size > 1 is evaluated with group privacy at report time "
                "(patchdp_opacus.privacy.group_epsilon); the engine's accountant protects one "
                "region per image — protect several regions as one Union mask instead")
        self.accountant.set_spec(loader.spec)
        out = super().make_private(
            module=module, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            poisson_sampling=False, **kwargs)
        dp_optimizer = out[1]
        world = torch.distributed.get_world_size() if distributed else 1
        # Opacus derives these from len(loader); fixed-size batches know them exactly.
        dp_optimizer.expected_batch_size = loader.batch_size // world
        self.target = self.__dict__.pop("_pending_target", None)
        account = self.accountant.get_optimizer_hook_fn(sample_rate=loader.sample_rate)

        def step_hook(optim):
            account(optim)
            self._check_budget()

        dp_optimizer.attach_step_hook(step_hook)
        self.data_loader = loader
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        logger.info("patch-level DP-SGD: q=%.6g p=%.6g (%s) w=q*p=%.6g z=%.6g C=%s",
                    loader.sample_rate, loader.inclusion_probability,
                    loader.spec.inclusion.fraction, loader.effective_sample_rate,
                    noise_multiplier, max_grad_norm)
        return out

    def make_private_with_epsilon(self, *, module, optimizer, data_loader, target_epsilon,
                                  target_delta, max_grad_norm, epochs=None, steps=None,
                                  level: str = "patch", criterion=torch.nn.CrossEntropyLoss(),
                                  poisson_sampling: bool = False, **kwargs):
        """Calibrate z so that ``epsilon <= target_epsilon`` after ``epochs`` epochs (or
        ``steps`` logical steps), then :meth:`make_private`.

        Steps are logical steps: ``epochs * len(data_loader)`` with ``len = round(N / B)``.
        ``level="record"`` calibrates for the record-level baseline (p = 1) instead — the same
        training, a different claim.  The crop/region arguments (``crop``, ``padding``,
        ``pad_if_needed``, ``private_region``, ``image_sizes``, ``group_size``,
        ``allow_unchecked_transforms``, ``seed``) and Opacus' other arguments are those of
        :meth:`make_private`."""
        if poisson_sampling:
            raise ValueError(_POISSON_REFUSAL)
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        if (epochs is None) == (steps is None):
            raise ValueError("pass exactly one of epochs= or steps=")
        if len(self.accountant) > 0:
            warnings.warn("make_private_with_epsilon after steps were already accounted: the "
                          "calibrated noise assumes a fresh budget, the total epsilon will be "
                          "higher", stacklevel=2)
        geometry = {k: kwargs.pop(k) for k in _GEOMETRY_ARGS if k in kwargs}
        loader = self._crop_loader(data_loader, module, **geometry)
        total_steps = int(steps) if steps is not None else int(round(epochs * len(loader)))
        p = loader.inclusion_probability if level == "patch" else 1.0
        z = accounting.calibrate_noise(target_epsilon, target_delta, loader.sample_rate, p,
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

    def get_epsilon(self, delta: float, level: str = "patch") -> float:
        """Epsilon of the steps taken so far: patch level (default) or ``level="record"``."""
        return self.accountant.get_epsilon(delta, level=level)

    def privacy_report(self, delta: float) -> dict:
        """Everything a reader needs to check the claim (JSON-able)."""
        acc = self.accountant
        spec = acc.spec
        report = {
            "relation": "patch-level substitution" if spec else "record-level substitution",
            "sampling": "fixed-size batches without replacement",
            "secure_sampling": self.secure_sampling,
            "history": [list(h) for h in acc.history],
            "steps": len(acc),
            "delta": delta,
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "epsilon_patch": acc.get_epsilon(delta, level="patch") if spec else None,
            "epsilon_record": acc.get_epsilon(delta, level="record"),
        }
        if spec is not None:
            report["geometry"] = spec.to_dict()
        if self.data_loader is not None:
            report.update(batch_size=self.data_loader.batch_size,
                          dataset_size=len(self.data_loader.dataset),
                          sample_rate=self.data_loader.sample_rate,
                          effective_sample_rate=self.data_loader.effective_sample_rate)
        return report

    def save_checkpoint(self, *, path, module, optimizer=None, checkpoint_dict=None, **kwargs):
        """Opacus' checkpoint plus the loader's sampling-generator state (resume continues the
        same batch/crop stream) — the accountant's state carries the geometry."""
        checkpoint_dict = dict(checkpoint_dict or {})
        gen = getattr(getattr(self.data_loader, "batch_sampler", None), "generator", None)
        if isinstance(gen, torch.Generator):
            checkpoint_dict["patchdp_sampler_rng_state"] = gen.get_state()
        return super().save_checkpoint(path=path, module=module, optimizer=optimizer,
                                       checkpoint_dict=checkpoint_dict, **kwargs)

    def load_checkpoint(self, *, path, module, optimizer=None, **kwargs):
        """Load module/optimizer/accountant; refuses a checkpoint of another geometry."""
        checkpoint = super().load_checkpoint(path=path, module=module, optimizer=optimizer,
                                             **kwargs)
        state = checkpoint.get("patchdp_sampler_rng_state")
        gen = getattr(getattr(self.data_loader, "batch_sampler", None), "generator", None)
        if state is not None and isinstance(gen, torch.Generator):
            gen.set_state(state)
        return checkpoint

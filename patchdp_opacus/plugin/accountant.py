"""Opacus accountant for Theorem 2 (patch-level DP-SGD with random crops).

History entries are Opacus-style ``(noise_multiplier z, sample_rate q, steps)`` with ``q = B / N``
(the batch sampling rate, *not* ``q * p``).  The inclusion probability ``p`` of the crop
geometry is applied exactly once, when epsilon is evaluated by the pure privacy layer; the
record-level epsilon of the same history is the same computation with ``p = 1``.

Levels (:data:`LEVELS`): one history, three analyses of it, each ``w = q * factor``
(:func:`amplification`): ``"patch"`` (``p`` of the spec's geometry), ``"record"`` (1) and
``"gaussian_augmentation"`` (``TV(sigma_aug)`` of the spec's
:class:`~patchdp_opacus.privacy.baselines.GaussianAugmentation`: only when the spec holds one,
i.e. when the loader that reads the same spec adds that noise to every sample).
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from opacus.accountants import IAccountant
from opacus.accountants.registry import create_accountant, register_accountant

from patchdp_opacus.privacy import accounting
from patchdp_opacus.privacy.spec import PatchPrivacySpec

logger = logging.getLogger(__name__)

MECHANISM = "patch_pld"
#: Neighbouring relation the accountant's numbers are valid for.
RELATION = "patch-level substitution, fixed-size batches sampled uniformly without replacement"

LEVELS = ("patch", "record", "gaussian_augmentation")


def amplification(spec: Optional[PatchPrivacySpec], level: str) -> float:
    """The factor of ``q`` in ``w`` for ``level``: ``p`` (patch), 1 (record) or
    ``TV(sigma_aug)`` (gaussian_augmentation).  The one place that maps a level to its factor
    (the accountant, the engine's calibration and the training app read it).

    Raises ``ValueError`` for an unknown level, and for ``gaussian_augmentation`` without a
    spec that holds the augmentation (no noise is added, so no TV may be claimed)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if level == "record":
        return 1.0
    if level == "patch":
        return 1.0 if spec is None else spec.inclusion_probability
    if spec is None or spec.augmentation is None:
        raise ValueError("level='gaussian_augmentation' needs the Gaussian noise augmentation in "
                         "the privacy spec (the loader then adds the noise to every sample): pass "
                         "gaussian_augmentation=GaussianAugmentation(sigma_aug, channels) to "
                         "make_private / CropDPDataLoader, or privacy.sigma_aug in a config")
    return spec.augmentation_tv


class GradientAccumulationError(RuntimeError):
    """Per-sample gradients of several independent loader draws would share one noisy step."""


class PatchPLDAccountant(IAccountant):
    """Theorem-2 PLD accountant.

    Args:
        spec: crop geometry, private region and image sizes (gives ``p``).  Without a spec the
            accountant has no patch claim and uses ``p = 1`` (record level) until
            :meth:`set_spec` is called; ``get_epsilon(..., inclusion_probability=p)`` overrides
            it for one call (this is how Opacus' ``get_noise_multiplier`` can be used).
        discretization: PLD discretisation in nats.
    """

    def __init__(self, spec: Optional[PatchPrivacySpec] = None, *,
                 discretization: float = accounting.DEFAULT_DISCRETIZATION):
        self.history = []  # [(noise_multiplier, sample_rate, steps)], read lazily
        self.spec = spec
        self.discretization = float(discretization)
        #: callables run before the history is read (the engine's check that the model changed
        #: only through the DP steps this history counts); each raises if the claim is void
        self.reading_checks: list[Callable[[], None]] = []

    @classmethod
    def mechanism(cls) -> str:
        return MECHANISM

    def set_spec(self, spec: PatchPrivacySpec) -> None:
        """Attach the geometry; refuses to change it (an optimizer attached under the old one
        keeps stepping this accountant, whose ``p`` would then be the new geometry's)."""
        if self.spec is not None and not self.spec.same_geometry(spec):
            raise ValueError("the accountant already holds another crop/patch geometry (an "
                             "earlier make_private, or a checkpoint); its steps would be "
                             "accounted with this geometry's p. Use a new PrivacyEngine for a "
                             "new geometry")
        self.spec = spec

    @property
    def inclusion_probability(self) -> float:
        """``p`` used for patch-level epsilon (1.0 without a spec)."""
        return 1.0 if self.spec is None else self.spec.inclusion_probability

    def step(self, *, noise_multiplier: float, sample_rate: float):
        if self.history and self.history[-1][0] == noise_multiplier \
                and self.history[-1][1] == sample_rate:
            z, q, steps = self.history.pop()
            self.history.append((z, q, steps + 1))
        else:
            self.history.append((noise_multiplier, sample_rate, 1))

    def __len__(self) -> int:
        return int(sum(steps for _, _, steps in self.history))

    def amplification(self, level: str = "patch") -> float:
        """The factor of ``q`` for ``level`` (see :func:`amplification`)."""
        return amplification(self.spec, level)

    def _runs(self, level: str, inclusion_probability: Optional[float]):
        for check in self.reading_checks:
            check()
        if inclusion_probability is not None and level == "patch":
            p = float(inclusion_probability)
        else:
            p = self.amplification(level)
        return [accounting.PatchDPSGD(z, q, p, steps) for z, q, steps in self.history]

    def get_epsilon(self, delta: float, *, level: str = "patch",
                    inclusion_probability: Optional[float] = None, **kwargs) -> float:
        """Epsilon (nats) of the steps in ``history`` at ``delta`` (per run).

        ``level="patch"`` uses the spec's ``p``; ``level="record"`` uses ``p = 1`` (the
        record-level baseline under substitution for the same steps);
        ``level="gaussian_augmentation"`` uses ``TV(sigma_aug)`` of the spec's augmentation."""
        return accounting.epsilon(self._runs(level, inclusion_probability), delta,
                                  self.discretization)

    def get_delta(self, epsilon: float, *, level: str = "patch") -> float:
        return accounting.delta(self._runs(level, None), epsilon, self.discretization)

    def get_optimizer_hook_fn(self, sample_rate: float) -> Callable:
        """One accountant step per logical optimizer step (Opacus calls the hook only for
        steps that are not skipped, so BatchMemoryManager chunks count once)."""

        def hook_fn(optim):
            k = optim.accumulated_iterations
            if k != 1:
                raise GradientAccumulationError(
                    f"optimizer.step() saw per-sample gradients of {k} loader batches. Each batch "
                    f"of the crop-aware loader is an independent fixed-size draw, so an image can "
                    f"enter one update several times, which Theorem 2 does not cover. Use one "
                    f"larger logical batch_size and opacus.utils.batch_memory_manager."
                    f"BatchMemoryManager(max_physical_batch_size=...) instead of accumulating.")
            self.step(noise_multiplier=optim.noise_multiplier, sample_rate=sample_rate)

        return hook_fn

    def state_dict(self, destination=None):
        destination = super().state_dict(destination)
        destination["spec"] = None if self.spec is None else self.spec.to_dict()
        destination["relation"] = RELATION
        destination["discretization"] = self.discretization
        return destination

    def load_state_dict(self, state_dict):
        spec = state_dict.get("spec")
        if state_dict.get("relation", RELATION) != RELATION:
            raise ValueError(f"checkpoint accounts for {state_dict['relation']!r}, not {RELATION!r}")
        if spec is not None:
            loaded = PatchPrivacySpec.from_dict(spec)
            if self.spec is not None and not self.spec.same_geometry(loaded):
                raise ValueError(
                    "checkpoint geometry differs from this accountant's: checkpoint "
                    f"{loaded.to_dict()} vs current {self.spec.to_dict()}. Resume with the same "
                    "crop, padding, private region and image sizes, or start a new run")
            if self.spec is None:
                self.spec = loaded
        elif self.spec is not None and state_dict.get("history"):
            raise ValueError("checkpoint has no patch geometry (record-level accounting); "
                             "it cannot be resumed under a patch-level claim")
        super().load_state_dict(state_dict)
        self.history = [tuple(h) for h in self.history]
        self.discretization = float(state_dict.get("discretization", self.discretization))


try:
    register_accountant(MECHANISM, PatchPLDAccountant)
except ValueError:  # already registered (module re-import)
    if not isinstance(create_accountant(MECHANISM), PatchPLDAccountant):
        raise

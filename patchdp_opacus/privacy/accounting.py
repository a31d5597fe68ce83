"""Theorem 2: privacy accounting of DP-SGD with random crops under patch-level substitution.

Mechanism (one logical step).  A fixed-size batch of ``B`` of the ``N`` images is drawn uniformly
*without replacement* (``q = B / N``); every image in it is randomly cropped; per-sample
gradients are clipped to norm ``C``, summed, and Gaussian noise of std ``z * C`` is added (``z``
is Opacus' ``noise_multiplier``).  Neighbouring data sets differ in one private region of one
image, which lands in the batch *and* in the crop with probability ``w = q * p`` (``p`` from
:mod:`patchdp_opacus.privacy.geometry`).

In units of ``C`` (substitution: sensitivity 2) one step is dominated by the pair

    P = (1 - w) N(0, z^2) + w N(2, z^2)    vs    Q = N(0, z^2)

through the *switched* privacy profile: ``delta(eps) = H_{e^eps}(P || Q)`` for ``eps >= 0``
(dp-accounting's REMOVE profile) and ``H_{e^eps}(Q || P)`` for ``eps < 0`` (its ADD profile).
From this one profile we build a single pessimistic connect-the-dots PLD and self-compose it
over the number of logical steps.  ``p = 1`` gives record-level DP-SGD with fixed-size batches
under substitution, the baseline reported beside the patch-level numbers.

Two tempting shortcuts are wrong here and deliberately not used: dp-accounting's
``REPLACE_ONE`` Gaussian (it models Poisson sampling) and composing the ADD and REMOVE PLDs
separately (each step may realise either orientation).

``delta`` is per run (for the whole composition); ``epsilon`` is in nats.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from dp_accounting.pld import pld_pmf, privacy_loss_distribution, privacy_loss_mechanism

#: Sensitivity of the summed clipped gradient under substitution, in units of the clip norm C.
SENSITIVITY = 2.0
#: Default PLD discretisation (nats).  The pessimistic construction upper-bounds the true
#: profile at any discretisation; finer is tighter and slower.
DEFAULT_DISCRETIZATION = 1e-4
_LOG_MASS_TRUNCATION = -50.0
#: Printed wherever p = 1 is met (the crop always covers the private region).
NO_AMPLIFICATION_WARNING = (
    "p = 1: every crop covers the private region wherever it lies, so cropping gives no "
    "amplification and the patch-level claim equals the record-level one; use a smaller crop, "
    "a larger image, or a smaller private region to gain from cropping")


def _check_rate(name, value, allow_zero=False):
    if not (0.0 < value <= 1.0 or (allow_zero and value == 0.0)) or math.isnan(value):
        raise ValueError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {value}")


def _check_args(noise_multiplier, effective_rate):
    if not noise_multiplier > 0 or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be a positive finite number (noise std = z * C), "
                         f"got {noise_multiplier}")
    _check_rate("effective sampling rate q*p", effective_rate, allow_zero=True)


def _gaussian_loss(noise_multiplier, effective_rate, adjacency):
    return privacy_loss_mechanism.GaussianPrivacyLoss(
        standard_deviation=noise_multiplier, sensitivity=SENSITIVITY,
        pessimistic_estimate=True, log_mass_truncation_bound=_LOG_MASS_TRUNCATION,
        sampling_prob=effective_rate, adjacency_type=adjacency)


def one_step_profile(noise_multiplier: float, effective_rate: float):
    """The switched one-step privacy profile ``delta(eps)`` of Theorem 2 as a vectorised
    function of ``eps`` (nats): REMOVE profile for ``eps >= 0``, ADD profile for ``eps < 0``."""
    _check_args(noise_multiplier, effective_rate)
    if effective_rate == 0:
        return lambda eps: np.maximum(0.0, 1.0 - np.exp(np.asarray(eps, dtype=float)))
    Adj = privacy_loss_mechanism.AdjacencyType
    remove = _gaussian_loss(noise_multiplier, effective_rate, Adj.REMOVE)
    add = _gaussian_loss(noise_multiplier, effective_rate, Adj.ADD)

    def profile(eps):
        eps = np.atleast_1d(np.asarray(eps, dtype=float))
        out = np.empty_like(eps)
        pos = eps >= 0
        if pos.any():
            out[pos] = remove.get_delta_for_epsilon(eps[pos])
        if (~pos).any():
            out[~pos] = add.get_delta_for_epsilon(eps[~pos])
        return out

    profile.bounds = (add.connect_dots_bounds().epsilon_lower,
                      remove.connect_dots_bounds().epsilon_upper)
    return profile


@functools.lru_cache(maxsize=16)
def step_pld(noise_multiplier: float, effective_rate: float,
             discretization: float = DEFAULT_DISCRETIZATION
             ) -> privacy_loss_distribution.PrivacyLossDistribution:
    """Pessimistic connect-the-dots PLD of one Theorem-2 step (one PMF, symmetric use)."""
    _check_args(noise_multiplier, effective_rate)
    if effective_rate == 0:
        return privacy_loss_distribution.identity(discretization)
    profile = one_step_profile(noise_multiplier, effective_rate)
    lower, upper = profile.bounds
    lo, hi = math.floor(lower / discretization), math.ceil(upper / discretization)
    if hi <= lo:
        hi = lo + 1
    deltas = profile(np.arange(lo, hi + 1) * discretization)
    # Guard tiny floating-point non-monotonicity at the switch point eps = 0.
    deltas = np.minimum.accumulate(np.clip(deltas, 0.0, 1.0))
    pmf = pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(discretization, lo, hi, deltas)
    return privacy_loss_distribution.PrivacyLossDistribution(pmf)


@functools.lru_cache(maxsize=4)
def composed_pld(noise_multiplier: float, effective_rate: float, steps: int,
                 discretization: float = DEFAULT_DISCRETIZATION):
    """``steps``-fold self-composition of :func:`step_pld`."""
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    base = step_pld(float(noise_multiplier), float(effective_rate), discretization)
    return base if steps == 1 else base.self_compose(steps) if steps > 1 else \
        privacy_loss_distribution.identity(discretization)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Logical steps in one epoch of fixed-size batches: ``N / B`` rounded to the nearest
    integer (halves up), at least 1.  The loader's sampler and the CLI both count with this."""
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"need N >= 1 and B >= 1, got N={num_samples}, B={batch_size}")
    return max(1, (2 * num_samples + batch_size) // (2 * batch_size))


@dataclass(frozen=True)
class PatchDPSGD:
    """Description of a DP-SGD run for Theorem 2 (the "event"; functions below evaluate it).

    noise_multiplier: z, noise std = z * C.  sample_rate: q = B / N (fixed-size batches without
    replacement).  inclusion_probability: p (1 = record level).  steps: logical steps."""

    noise_multiplier: float
    sample_rate: float
    inclusion_probability: float
    steps: int

    def __post_init__(self):
        _check_rate("sample_rate", self.sample_rate)
        _check_rate("inclusion_probability", self.inclusion_probability)
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps}")

    @property
    def effective_sample_rate(self) -> float:
        """w = q * p."""
        return float(self.sample_rate) * float(self.inclusion_probability)

    def record_level(self) -> "PatchDPSGD":
        return PatchDPSGD(self.noise_multiplier, self.sample_rate, 1.0, self.steps)


def _runs(run_or_runs) -> list[PatchDPSGD]:
    runs = [run_or_runs] if isinstance(run_or_runs, PatchDPSGD) else list(run_or_runs)
    return [r for r in runs if r.steps > 0]


def _pld(run_or_runs, discretization: float):
    """PLD of one run, or of several runs composed in sequence (e.g. a changing noise
    multiplier: Opacus' accountant history)."""
    runs = _runs(run_or_runs)
    pld = None
    for r in runs:
        cur = composed_pld(float(r.noise_multiplier), r.effective_sample_rate, int(r.steps),
                           discretization)
        pld = cur if pld is None else pld.compose(cur)
    return pld


def _check_delta(delta):
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1) (per run), got {delta}")


def epsilon(run, delta: float, discretization: float = DEFAULT_DISCRETIZATION) -> float:
    """Smallest ``eps`` (nats) with the run ``(eps, delta)``-DP under patch-level substitution
    (an upper bound: the PLD is pessimistic).  ``run`` is a :class:`PatchDPSGD` or a sequence
    of them composed in order.  0 when no step was taken."""
    _check_delta(delta)
    if not _runs(run):
        return 0.0
    return max(0.0, float(_pld(run, discretization).get_epsilon_for_delta(delta)))


def delta(run, eps: float, discretization: float = DEFAULT_DISCRETIZATION) -> float:
    """``delta(eps)`` of the whole run (or sequence of runs; an upper bound)."""
    if not _runs(run):
        return max(0.0, 1.0 - math.exp(eps))
    return float(_pld(run, discretization).get_delta_for_epsilon(eps))


def privacy_profile(run, epsilons, discretization: float = DEFAULT_DISCRETIZATION
                    ) -> np.ndarray:
    """``delta(eps)`` of the run (or sequence of runs) for each ``eps`` of a grid."""
    eps = np.asarray(epsilons, dtype=float)
    if not _runs(run):
        return np.maximum(0.0, 1.0 - np.exp(eps))
    return np.asarray(_pld(run, discretization).get_delta_for_epsilon(eps), dtype=float)


def group_epsilon(run: PatchDPSGD, delta: float, group_size: int,
                  discretization: float = DEFAULT_DISCRETIZATION) -> float:
    """``eps`` protecting ``group_size`` private regions of one image.

    Two valid bounds, the smaller is returned: (a) group privacy — if the run is ``(e, d)``-DP
    for one region it is ``(k e, k e^{(k-1) e} d)``-DP for ``k`` regions; the single-region
    ``e`` is searched on a fine grid (every grid point is valid) — and (b) the record-level
    epsilon (``p = 1``), which covers any change within one image.  A tighter alternative is
    one :class:`~.regions.Union` mask of the regions."""
    _check_delta(delta)
    k = int(group_size)
    if k < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if k == 1:
        return epsilon(run, delta, discretization)
    if not _runs(run):
        return 0.0
    record = epsilon([r.record_level() for r in _runs(run)], delta, discretization)
    pld = _pld(run, discretization)
    hi = max(1.0, float(pld.get_epsilon_for_delta(delta / k)))
    grid = np.concatenate([np.linspace(0.0, hi * 4, 20001),
                           np.geomspace(hi * 4, max(hi * 4, 700.0), 2001)])
    d = np.asarray(pld.get_delta_for_epsilon(grid), dtype=float)
    with np.errstate(divide="ignore"):
        ok = math.log(k) + (k - 1) * grid + np.log(np.maximum(d, 0.0)) <= math.log(delta)
    group = float(k * grid[np.argmax(ok)]) if ok.any() else math.inf
    return min(group, record)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float,
                    inclusion_probability: float, steps: int, *,
                    discretization: float = DEFAULT_DISCRETIZATION,
                    tolerance: float = 1e-3, max_noise: float = 1e3) -> float:
    """Smallest noise multiplier ``z`` (to ``tolerance``, relative) whose run has
    ``epsilon <= target_epsilon``; the returned ``z`` always satisfies the target at
    ``discretization``.

    Bisection on ``z`` (``epsilon`` decreases in ``z``), each probe a full PLD composition,
    over a ladder of discretisations 1e-2, 1e-3, ... down to ``discretization``: each rung
    re-brackets the previous rung's answer and bisects it to ``tolerance``, and a probe costs
    about 10x less per rung up. On the last rung only the upper end is probed (the returned
    ``z`` is checked at ``discretization``); the lower end's ``epsilon > target`` is known at
    the rung before. The pessimistic PLD upper-bounds the true profile at every rung, and a
    10x finer one moved epsilon by ~1e-5 (relative) in the settings we measured, far inside
    ``tolerance``; if the last rung's upper end fails the target it is re-bracketed and
    bisected there."""
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    _check_delta(delta)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate noise")

    def eps_at(z, disc):
        return epsilon(PatchDPSGD(z, sample_rate, inclusion_probability, steps), delta, disc)

    def bisect(lo, hi, disc):
        while hi - lo > tolerance * hi:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if eps_at(mid, disc) > target_epsilon else (lo, mid)
        return lo, hi

    ladder = [d for d in (1e-2, 1e-3, 1e-4, 1e-5) if d > discretization] + [discretization]
    # first rung: bracket from z = 1 by doubling (lo = 0 stands for "epsilon > target")
    lo, hi = 0.0, 1.0
    while eps_at(hi, ladder[0]) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > max_noise:
            raise ValueError(f"target_epsilon={target_epsilon} needs noise_multiplier > {max_noise}")
    lo, hi = bisect(lo, hi, ladder[0])
    for rung, disc in enumerate(ladder[1:], start=1):
        # re-bracket with steps that start at 2 * tolerance and double: a finer rung moves
        # the answer by little, so the bisection that follows is short
        step = 2 * tolerance
        while eps_at(hi, disc) > target_epsilon:
            lo, hi, step = hi, hi * (1 + step), 2 * step
        step = 2 * tolerance
        while rung < len(ladder) - 1 and lo > 0 and eps_at(lo, disc) <= target_epsilon:
            lo, hi, step = lo * (1 - step), lo, min(2 * step, 0.5)
        lo, hi = bisect(lo, hi, disc)
    return hi


#: How Opacus' accountants model DP-SGD (the orientation number next to our claims).
OPACUS_RELATION = "record-level add/remove, Poisson sampling (as Opacus' accountants)"


def add_remove_poisson_epsilon(history, delta: float, discretization: float = 1e-3) -> float:
    """Record-level epsilon under *add/remove* of one record with *Poisson* sampling -- the
    relation and sampling Opacus' accountants analyse -- for ``history`` = ``[(z, q, steps),
    ...]`` (sensitivity 1 in units of C, noise std ``z * C``), by dp-accounting's PLD
    accountant.

    For orientation only: it is *not* a claim about fixed-size batches or about substitution
    (the patch relation needs substitution: the image stays in the data set, only its private
    region changes, so one step's sensitivity is 2C).  Opacus' 'prv' accountant evaluates the
    same mechanism (it agrees within its own error bound; tested).  ``delta`` per run."""
    from dp_accounting import NeighboringRelation, dp_event
    from dp_accounting.pld import PLDAccountant

    _check_delta(delta)
    accountant = PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE,
                               value_discretization_interval=float(discretization))
    for z, q, steps in history:
        _check_args(z, q)
        accountant.compose(dp_event.PoissonSampledDpEvent(
            float(q), dp_event.GaussianDpEvent(float(z))), int(steps))
    return float(accountant.get_epsilon(float(delta)))

"""The names of run folders (cheap to import: the CLI, the grid runner and ``patchdp
reproduce`` agree on them)."""

from __future__ import annotations

from typing import Optional


def run_name(accounting: str, epsilon: Optional[float] = None,
             noise_multiplier: Optional[float] = None, seed: int = 0,
             sigma_aug: Optional[float] = None) -> str:
    """``<accounting>[_sigma<A>]_<eps<E>|z<Z>>_seed<S>``: the Gaussian-augmentation baseline
    names its ``sigma_aug`` (several may be run), a non-private run is ``none_seed<S>``."""
    parts = [accounting]
    if accounting == "gaussian_augmentation" and sigma_aug is not None:
        parts.append(f"sigma{sigma_aug:g}")
    if epsilon is not None:
        parts.append(f"eps{epsilon:g}")
    elif noise_multiplier is not None:
        parts.append(f"z{noise_multiplier:g}")
    return "_".join(parts + [f"seed{seed}"])

"""The paper's privacy-only figures: privacy profiles (Fig. 2, 17-22), epsilon sweeps over crop
and patch size (Fig. 4, 23-28) and the privacy side of the Gaussian-augmentation comparison
(Fig. 11-12). Every number comes from :mod:`patchdp_opacus.privacy` (``p`` from the spec,
epsilon/delta from the Theorem-2 accountant, the baselines from :mod:`~.privacy.baselines`);
this module chooses settings, calls those functions, draws and writes CSV.

Discretisation: the PLD is pessimistic, so every curve is an upper bound at any discretisation;
a coarser one is faster and looser (at 1e-3 nats a tiny epsilon such as 0.13 reads 0.25, an
epsilon above 1 moves by < 1 %). Each figure states the one it used.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from patchdp_opacus.privacy import (
    calibrate_noise,
    data_level_profile,
    epsilon,
    gaussian_augmentation_tv,
    privacy_profile,
)
from patchdp_opacus.reproduce.settings import PAPER, PrivacySetting, epsilon_grid

__all__ = ["FigureOutput", "augmentation_rows", "draw", "profile_rows", "saturation_threshold",
           "sweep_rows", "write_csv"]

COLORS = {"patch": "#377eb8", "record": "#ff7f0e", "data": "#4daf4a"}


@dataclass
class FigureOutput:
    """What one figure command wrote, and the lines it reports (settings chosen, checks)."""

    png: Path
    csv: Path
    notes: list[str] = field(default_factory=list)


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def sigma_label(s: PrivacySetting) -> str:
    return f"σ = {s.sigma:g} (z = {s.noise_multiplier:g})"


# --------------------------------------------------------------------------- profiles

def profile_rows(panel: str, setting: PrivacySetting, grid, discretization: float) -> list[dict]:
    """delta(eps) of patch-level and record-level DP-SGD and of the data-level baseline (the
    region's bounding box sets its sensitivity) at every eps of ``grid``."""
    spec = setting.spec()
    run = setting.run()
    curves = {"delta_patch": privacy_profile(run, grid, discretization),
              "delta_record": privacy_profile(run.record_level(), grid, discretization),
              "delta_data_level": data_level_profile(setting.sigma_data, spec.region.size, grid,
                                                     setting.channels)}
    common = {"panel": panel, "image": f"{setting.image_size[0]}x{setting.image_size[1]}",
              "crop": setting.crop, "region": f"{spec.region.name} "
              f"{spec.region.size[0]}x{spec.region.size[1]}", "sigma_paper": setting.sigma,
              "noise_multiplier": setting.noise_multiplier, "p": spec.inclusion_probability,
              "sigma_data": setting.sigma_data, "steps": setting.steps,
              "sample_rate": setting.sample_rate}
    # dp-accounting returns tiny negative rounding errors (clipped to 0 here) and NaN where
    # e^eps overflows float64 (eps > 709; kept as NaN: not computed, not drawn)
    curves = {k: np.where(v < 0, 0.0, v) for k, v in curves.items()}
    return [dict(common, epsilon=float(e), **{k: float(v[i]) for k, v in curves.items()})
            for i, e in enumerate(grid)]


def _draw_profiles(ax, rows, title, *, data_level=True):
    eps = [r["epsilon"] for r in rows]
    p = rows[0]["p"]
    ax.semilogx(eps, [r["delta_patch"] for r in rows], color=COLORS["patch"],
                label=f"patch-level (p = {p:.3g})")
    ax.semilogx(eps, [r["delta_record"] for r in rows], color=COLORS["record"],
                label="record-level (minibatch only)")
    if data_level:
        ax.semilogx(eps, [r["delta_data_level"] for r in rows], color=COLORS["data"],
                    label=f"data-level noise (σ_data = {rows[0]['sigma_data']:g})")
    ax.set_xlim(0.1, 1000)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("ε (nats)")
    ax.set_ylabel("δ(ε) of the whole run")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


# --------------------------------------------------------------------------- sweeps

def saturation_threshold(setting: PrivacySetting, quantity: str) -> int | None:
    """Smallest crop side (``quantity="crop"``) or square-patch side (``"patch"``) at which the
    exact ``p`` equals 1, or None when no size that fits the image reaches it."""
    top = min(setting.image_size)
    for v in range(1, top + 1):
        try:
            here = setting.with_(crop=v) if quantity == "crop" else setting.with_(patch=(v, v))
            if here.spec().inclusion.fraction == 1:
                return v
        except ValueError:  # region larger than the crop's image, or crop too small: skip
            continue
    return None


def sweep_rows(panel: str, base: PrivacySetting, quantity: str, values, sigmas,
               discretization: float) -> list[dict]:
    """Patch- and record-level epsilon at ``base.delta`` for every swept crop side or square
    patch side and every paper sigma."""
    rows = []
    for sigma in sigmas:
        s = base.with_(sigma=sigma)
        record = epsilon(s.run(1.0), s.delta, discretization)
        for v in values:
            here = s.with_(crop=v) if quantity == "crop" else s.with_(patch=(v, v))
            inc = here.spec().inclusion
            run = here.run(inc.value)
            rows.append({"panel": panel, "image": f"{s.image_size[0]}x{s.image_size[1]}",
                         "quantity": quantity, "value": v, "crop": here.crop,
                         "patch": here.patch[0], "sigma_paper": sigma,
                         "noise_multiplier": s.noise_multiplier, "p": inc.value,
                         "p_fraction": f"{inc.fraction.numerator}/{inc.fraction.denominator}",
                         "saturated": inc.fraction == 1, "w": run.effective_sample_rate,
                         "epsilon_patch": epsilon(run, s.delta, discretization),
                         "epsilon_record": record})
    return rows


def _draw_sweep(ax, rows, quantity, threshold, title):
    sigmas = list(dict.fromkeys(r["sigma_paper"] for r in rows))
    for i, sigma in enumerate(sigmas):
        mine = [r for r in rows if r["sigma_paper"] == sigma]
        color = f"C{i}"
        ax.plot([r["value"] for r in mine], [r["epsilon_patch"] for r in mine], "o-", ms=3,
                color=color,
                label=f"patch-level, σ = {sigma:g} (z = {mine[0]['noise_multiplier']:g})")
        ax.axhline(mine[0]["epsilon_record"], ls="--", color=color, alpha=0.6,
                   label=f"record-level, σ = {sigma:g}")
    if threshold is not None:
        ax.axvline(threshold, ls=":", color="0.4")
        ax.text(threshold, 0.55, f" p = 1 from {quantity} {threshold}", fontsize=7,
                color="0.3", rotation=90, transform=ax.get_xaxis_transform())
    else:
        ax.text(0.55, 0.5, "p < 1 for every size that fits:\nnever saturates",
                transform=ax.transAxes, fontsize=7, color="0.3")
    records = [r["epsilon_record"] for r in rows]
    if max(records) > 10 * min(records):  # noise levels an order of magnitude apart
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(f"{quantity} side (pixels)")
    ax.set_ylabel(f"ε (nats) at δ = {PAPER.delta:g}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="upper left")


# --------------------------------------------------------------------------- augmentation

def augmentation_rows(panel: str, setting: PrivacySetting, sigma_augs, targets,
                      discretization: float, tolerance: float = 1e-2) -> list[dict]:
    """Noise multiplier z that reaches each target epsilon (at ``setting.delta``) under
    record-level accounting, patch-level (w = q p) and Gaussian-noise augmentation with each
    ``sigma_aug`` (pixel units; w = q TV(sigma_aug), :func:`gaussian_augmentation_tv`)."""
    spec = setting.spec()
    factors = {"record-level": 1.0, "patch-level": spec.inclusion_probability}
    for s in sigma_augs:
        factors[f"Gaussian augmentation σ_aug = {s:g}"] = gaussian_augmentation_tv(
            s, spec.region.size, setting.channels)
    rows = []
    for curve, factor in factors.items():
        for target in targets:
            z = calibrate_noise(target, setting.delta, setting.sample_rate, factor,
                                setting.steps, discretization=discretization,
                                tolerance=tolerance)
            rows.append({"panel": panel, "curve": curve, "amplification": factor,
                         "target_epsilon": target, "noise_multiplier": z,
                         "delta": setting.delta, "steps": setting.steps,
                         "sample_rate": setting.sample_rate})
    return rows


def _draw_tv(ax, setting: PrivacySetting, title):
    spec = setting.spec()
    sig = np.logspace(1, 5, 200)
    tv = [gaussian_augmentation_tv(s, spec.region.size, setting.channels) for s in sig]
    ax.semilogx(sig, tv, color=COLORS["data"], label="Gaussian augmentation: TV(σ_aug)")
    ax.axhline(spec.inclusion_probability, color=COLORS["patch"],
               label=f"patch-level: p = {spec.inclusion_probability:.3g}")
    ax.axhline(1.0, color=COLORS["record"], ls="--", label="record-level: 1")
    ax.axvline(255, color="0.5", ls=":", label="σ_aug = 255 (the pixel range)")
    ax.set_xlabel("σ_aug (pixel units)")
    ax.set_ylabel("amplification factor (w / q)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def _draw_calibration(ax, rows, title):
    for i, curve in enumerate(dict.fromkeys(r["curve"] for r in rows)):
        mine = [r for r in rows if r["curve"] == curve]
        color = {"record-level": COLORS["record"], "patch-level": COLORS["patch"]}.get(
            curve, f"C{i + 2}")
        style = dict(marker="s", mfc="none", ms=7, ls="--", zorder=3) \
            if curve == "record-level" else dict(marker="o", ms=3, ls="-")
        ax.loglog([r["target_epsilon"] for r in mine], [r["noise_multiplier"] for r in mine],
                  color=color, label=f"{curve} ({mine[0]['amplification']:.3g})", **style)
    ax.set_xlabel("target ε (nats)")
    ax.set_ylabel("noise multiplier z (std z·C)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="upper right", title="accounting (w / q)", title_fontsize=6)


# --------------------------------------------------------------------------- drawing

def draw(path: Path, panels, suptitle: str, ncols: int | None = None) -> None:
    """One PNG of ``panels``: a list of ``(draw_function, args)``; draw_function(ax, *args)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = ncols or len(panels)
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(5.2 * ncols, 4.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (fn, args) in zip(axes, panels):
        fn(ax, *args)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(suptitle, fontsize=10)
    fig.savefig(path, dpi=130)


PANEL_DRAWERS = {"profile": _draw_profiles, "sweep": _draw_sweep, "tv": _draw_tv,
                 "calibration": _draw_calibration}
__all__ += ["PANEL_DRAWERS", "epsilon_grid", "sigma_label"]

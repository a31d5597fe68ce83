"""Figure helpers for the CLI: matplotlib's object API with the Agg canvas (no pyplot, no GUI
backend, no global figure state).  matplotlib is imported only when a figure is drawn.

House style of the figures: the title names the setting, the legend sits below the axes (never
on the curves), axes whose values span a decade or more are logarithmic."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Iterable

from patchdp_opacus.commands import UsageError


def check_out_path(path: str, flag: str = "--out") -> Path:
    """Fail early (before any long computation) when the figure cannot be written."""
    out = Path(path)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"{flag} {path}: use a .png, .pdf or .svg file name")
    if not out.parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {str(out.parent)!r} does not exist")
    return out


def spans_decades(values: Iterable[float], ratio: float = 10.0) -> bool:
    """True when the positive finite ``values`` are all > 0 and max/min >= ``ratio``."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return bool(vals) and min(vals) > 0 and max(vals) / min(vals) >= ratio


def new_figure(title: str, xlabel: str, ylabel: str, *, logy: bool = False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    keep = title.replace(" = ", "\u00a0=\u00a0")  # never wrap inside "q = 0.07"
    ax.set_title("\n".join(textwrap.wrap(keep, 80)), fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def log_axis(ax, which: str, ticks=None) -> None:
    """Logarithmic ``which`` axis ("x" or "y") labelled with plain numbers (1, 10, 0.5), at
    ``ticks`` when given (e.g. the swept values)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if ticks is not None:
        axis.set_ticks(list(ticks))
        axis.set_minor_locator(NullLocator())
    else:
        axis.set_minor_formatter(NullFormatter())


def save(fig, path: Path, flag: str = "--out") -> None:
    """Legend below the axes (off the curves), then write the file."""
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize=8,
                   ncol=2 if len(handles) > 3 else 1, frameon=False)
    try:
        fig.savefig(path, dpi=150)
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"{flag} {path}: cannot write the figure ({reason})") from None

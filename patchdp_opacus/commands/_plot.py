"""Figure helpers for the CLI: matplotlib's object API with the Agg canvas (no pyplot, no GUI
backend, no global figure state).  matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from pathlib import Path

from patchdp_opacus.commands import UsageError


def check_out_path(path: str, flag: str = "--out") -> Path:
    """Fail early (before any long computation) when the figure cannot be written."""
    out = Path(path)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UsageError(f"{flag} {path}: use a .png, .pdf or .svg file name")
    if not out.parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {str(out.parent)!r} does not exist")
    return out


def new_figure(title: str, xlabel: str, ylabel: str, *, logy: bool = False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def save(fig, path: Path, flag: str = "--out") -> None:
    fig.axes[0].legend(fontsize=8)
    try:
        fig.savefig(path, dpi=150)
    except OSError as exc:
        reason = exc.strerror or exc
        raise UsageError(f"{flag} {path}: cannot write the figure ({reason})") from None

"""What the figures show: profile (target delta line, delta clipped at 1), sweep (log axes
where values span decades, the region shape in the title), plot (mean ± std over seeds for
both accountings); legends never on the curves."""

from __future__ import annotations

import json

import numpy as np
import pytest

from patchdp_opacus.cli import main
from patchdp_opacus.commands import _plot

SCHEDULE = ["--dataset-size", "1000", "--batch-size", "100", "--steps", "5", "--discretization",
            "1e-3"]
SMALL = ["--image-size", "256", "256", "--crop-size", "64", "64", *SCHEDULE]


@pytest.fixture
def figures(monkeypatch):
    """The figures the CLI saves (then saved for real)."""
    seen = []
    original = _plot.save

    def capture(fig, path, flag="--out"):
        seen.append(fig)
        original(fig, path, flag)

    monkeypatch.setattr(_plot, "save", capture)
    return seen


def _legend_off_the_axes(fig):
    ax = fig.axes[0]
    assert ax.get_legend() is None and len(fig.legends) == 1
    legend_box = fig.legends[0].get_window_extent()
    assert legend_box.y1 <= ax.get_window_extent().y0 + 1  # below the axes


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_profile_target_delta_line_and_clip_at_one(tmp_path, capsys, figures):
    run(["profile", *SMALL, "--patch-size", 8, 8, "--noise-multiplier", 0.5, "--epsilons", 0, 1,
         2, "--out", tmp_path / "p.png"], capsys)
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_ylim()[1] == 1.0 and ax.get_yscale() == "log"
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    assert all(np.nanmax(y) <= 1.0 for y in ys)
    target = [line for line in ax.get_lines() if line.get_label().startswith("target delta")]
    assert len(target) == 1 and set(target[0].get_ydata()) == {1 / 1000}
    assert "rectangle private region" in ax.get_title()
    _legend_off_the_axes(fig)


@pytest.mark.parametrize("kind, values, extra, xscale", [
    ("noise", ["0.5", "1", "8"], ["--patch-size", "8", "8"], "log"),
    ("crop", ["32", "48"], ["--patch-size", "8", "8", "--noise-multipliers", "1"], "linear"),
    ("patch", ["1", "4", "16"], ["--noise-multipliers", "1", "2"], "log"),
])
def test_sweep_axes_and_titles(tmp_path, capsys, figures, kind, values, extra, xscale):
    crop = [] if kind == "crop" else ["--crop-size", "64", "64"]
    run(["sweep", kind, "--values", *values, *extra, "--patch-shape", "circle", "--image-size",
         "256", "256", *crop, *SCHEDULE, "--delta", "1e-5", "--out", tmp_path / "s.png"], capsys)
    (fig,) = figures
    ax = fig.axes[0]
    assert ax.get_xscale() == xscale
    assert "circle" in ax.get_title()
    if xscale == "log":  # ticks at the swept values, as plain numbers
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"{float(v):g}" for v in values]
    _legend_off_the_axes(fig)


def _final(tmp_path, name, accounting, eps, seed, miou):
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "final_metrics.json").write_text(json.dumps(
        {"accounting": accounting, "target_epsilon": eps, "seed": seed, "miou": miou}))


def test_plot_mean_and_std_over_seeds_for_both_accountings(tmp_path, capsys, figures):
    for i, (acc, eps, seed, miou) in enumerate([
            ("patch", 1, 10, 0.30), ("patch", 1, 20, 0.34), ("patch", 100, 10, 0.6),
            ("patch", 100, 20, 0.64), ("record", 1, 10, 0.1), ("record", 1, 20, 0.14),
            ("record", 100, 10, 0.5), ("record", 100, 20, 0.5)]):
        _final(tmp_path, f"r{i}", acc, eps, seed, miou)
    out = run(["plot", tmp_path / "runs", "--out", tmp_path / "f.png", "--json"], capsys)
    points = json.loads(out)
    first = next(p for p in points if p["accounting"] == "patch" and p["epsilon"] == 1)
    assert first["miou_mean"] == pytest.approx(0.32) and first["miou_std"] == pytest.approx(0.02)
    assert first["seeds"] == 2
    (fig,) = figures
    ax = fig.axes[0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("patch-level" in t for t in labels) and any("record-level" in t for t in labels)
    assert len(ax.collections) >= 2  # a ± std band per accounting (plus error bars)
    assert ax.get_xscale() == "log"  # epsilon 1 .. 100
    _legend_off_the_axes(fig)

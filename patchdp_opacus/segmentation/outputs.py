"""Segmentation's part of the run outputs: ``prediction.png`` (validation images | ground truth |
prediction, with a class legend).  The files every run writes are in
:mod:`patchdp_opacus.app.outputs` (re-exported here for existing imports)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from patchdp_opacus.app.outputs import *  # noqa: F401,F403
from patchdp_opacus.app.outputs import (  # noqa: F401 - names used by existing imports
    CONFIG_YAML,
    FINAL_JSON,
    LOSS_COLUMN,
    LOSS_NOTE,
    METRICS_CSV,
    REPORT_JSON,
    REPORT_TXT,
    RunOutputs,
    class_names,
    dumps,
    fmt,
    history_segments,
    iou_by_class,
    iou_table,
    json_safe,
    report_lines,
    run_report,
    segments_text,
    used_noise_multiplier,
)

PREDICTION_PNG = "prediction.png"


def write_prediction(out: RunOutputs, model, dataset, device, names: Sequence[str],
                     num_images: int = 4) -> None:
    """``prediction.png`` in the run folder of ``out``."""
    samples = predict_samples(model, dataset, device, num_images)
    if samples:
        save_prediction_figure(samples, names, out.path(PREDICTION_PNG))


# --------------------------------------------------------------------------- prediction.png

CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)
IGNORED_COLOUR = np.array((0, 0, 0), dtype=np.uint8)


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colours: the Cityscapes palette, then evenly spaced hues."""
    if num_classes <= len(CITYSCAPES_PALETTE):
        return CITYSCAPES_PALETTE[:num_classes]
    import colorsys

    extra = [colorsys.hsv_to_rgb(i / (num_classes - 19), 0.65, 0.9)
             for i in range(num_classes - len(CITYSCAPES_PALETTE))]
    return np.concatenate([CITYSCAPES_PALETTE,
                           (np.array(extra) * 255).round().astype(np.uint8)])


def colorize(mask: np.ndarray, num_classes: int = len(CITYSCAPES_PALETTE)) -> np.ndarray:
    """Class ids (H, W) -> RGB (H, W, 3); ignored / unknown ids black."""
    colours = palette(num_classes)
    out = np.zeros((*mask.shape, 3), dtype=np.uint8)
    valid = (mask >= 0) & (mask < len(colours))
    out[valid] = colours[mask[valid]]
    return out


@torch.no_grad()
def predict_samples(model, dataset, device, num_images: int = 4) -> list[tuple]:
    """``[(image (H, W, 3) uint8, ground truth (H, W), prediction (H, W))]`` for up to
    ``num_images`` validation images spread over ``dataset``."""
    n = len(dataset)
    if n == 0:
        return []
    indices = sorted(set(np.linspace(0, n - 1, min(n, num_images)).round().astype(int)))
    was_training = model.training
    model.eval()
    samples = []
    for i in indices:
        image, mask = dataset[int(i)]
        pred = model(image.unsqueeze(0).to(device)).argmax(1)[0].cpu().numpy()
        samples.append((image.permute(1, 2, 0).numpy().astype(np.uint8), mask.numpy(), pred))
    model.train(was_training)
    return samples


def save_prediction_figure(samples: list[tuple], names: Sequence[str], path: Path,
                           ignore_index: int = 255) -> None:
    """One row per sample: image | ground truth | prediction (with its pixel accuracy), and a
    legend of the classes shown, with their names."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    colours = palette(len(names))
    h, w = samples[0][1].shape
    panel_w = 3.6
    panel_h = panel_w * h / w
    fig = Figure(figsize=(3 * panel_w + 0.4, len(samples) * (panel_h + 0.3) + 1.0),
                 layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(samples), 3, squeeze=False)
    fig.get_layout_engine().set(w_pad=0.06, h_pad=0.08, wspace=0.03, hspace=0.05)
    shown: set[int] = set()
    has_ignored = False
    for row, (image, gt, pred) in enumerate(samples):
        valid = gt != ignore_index
        acc = float((pred[valid] == gt[valid]).mean()) if valid.any() else math.nan
        panels = [(image, "image"), (colorize(gt, len(names)), "ground truth"),
                  (colorize(pred, len(names)), f"prediction (pixel accuracy {fmt(acc, '.2f')})")]
        for col, (pixels, title) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(pixels, interpolation="nearest")
            ax.set_title(f"val image {row + 1}: {title}" if col == 0 else title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("0.35")
                spine.set_linewidth(1.0)
        shown.update(int(c) for c in np.unique(np.concatenate([gt[valid], pred.ravel()]))
                     if 0 <= c < len(names))
        has_ignored |= bool((~valid).any())
    handles = [Patch(facecolor=colours[c] / 255, edgecolor="0.3", label=names[c])
               for c in sorted(shown)]
    if has_ignored:
        handles.append(Patch(facecolor=IGNORED_COLOUR / 255, edgecolor="0.3",
                             label=f"ignored ({ignore_index})"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7),
               fontsize=8, frameon=False, title="classes (colours of ground truth and "
                                                  "prediction)", title_fontsize=8)
    fig.savefig(path, dpi=110)

"""The files a training run writes, and how its numbers are shown (both tasks).

:class:`RunOutputs` owns the run folder (created at the first write, so a run that fails before
its first epoch leaves nothing behind):

* ``config.yaml`` — the config the run used, after command-line overrides (listed in its
  header);
* ``metrics.csv`` — one row per epoch: ``epoch`` (1-based), ``steps`` (logical DP-SGD steps so
  far), ``lr``, ``epsilon_patch`` / ``epsilon_record`` (and ``epsilon_gaussian_augmentation``
  when the loader adds that noise; nats, at the run's delta, after the epoch; empty for a
  non-private run), the task's metrics on evaluation epochs (``miou`` / ``pixel_accuracy`` for
  segmentation, ``accuracy`` / ``mean_per_class_accuracy`` for classification; empty
  otherwise), ``epoch_seconds`` and ``elapsed_seconds`` (wall clock, training and evaluation),
  ``time`` (local time at the end of the epoch).  Nothing computed from private training
  batches is in it: with the opt-in ``training.log_train_loss`` one more column,
  :data:`LOSS_COLUMN`, says that it is not covered by epsilon;
* ``tensorboard/`` — the same scalars, when the optional ``tensorboard`` package is installed;
* ``privacy_report.json`` / ``.txt`` — the claim: geometry, p, q, every noise multiplier used
  (per history segment), both epsilons, where the noise and the sampling came from;
* ``final_metrics.json`` — the task's metrics (segmentation: mIoU, pixel accuracy, per-class
  IoU as ``{class name: IoU}``; classification: top-1 accuracy, per-class accuracy, the
  confusion matrix on request), every epsilon, steps;
* a task's figures (segmentation: ``prediction.png``, written through :meth:`RunOutputs.path`).

Every JSON file is strict JSON: non-finite numbers (an IoU of an absent class, an unbounded
epsilon) are written as ``null``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

CONFIG_YAML = "config.yaml"
REPORT_JSON = "privacy_report.json"
REPORT_TXT = "privacy_report.txt"
METRICS_CSV = "metrics.csv"
FINAL_JSON = "final_metrics.json"
TENSORBOARD_DIR = "tensorboard"

#: TensorBoard tags of the evaluation columns of metrics.csv (both tasks).
EVAL_TAGS = {"miou": "eval/mIoU", "pixel_accuracy": "eval/pixel_accuracy",
             "accuracy": "eval/top1_accuracy",
             "mean_per_class_accuracy": "eval/mean_per_class_accuracy"}

#: Column (and TensorBoard tag) of the opt-in training loss: an un-noised statistic of the
#: private training batches.
LOSS_COLUMN = "train_loss_not_covered_by_epsilon"
LOSS_NOTE = ("training loss of private batches, released without noise: NOT covered by "
             "epsilon")

NOISE_FROM_SEED = "reproducible from the seed — not private if the seed is known"
NOISE_FROM_OS = "drawn from OS entropy, not reproducible from the config"
SAMPLING_FROM_SEED = ("batches and crops reproducible from the seed — not private if the seed "
                      "is known")
SAMPLING_FROM_OS = "batches and crops drawn from OS entropy, not reproducible from the config"
SAMPLING_SECURE = "batches and crops drawn from the OS CSPRNG (secrets)"


# --------------------------------------------------------------------------- numbers

def json_safe(value: Any) -> Any:
    """A copy of ``value`` that ``json.dumps(..., allow_nan=False)`` accepts: non-finite floats
    become None, tuples lists, numpy/torch scalars Python numbers, anything else its string."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, type(None), str)):
        return value
    if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def dumps(value: Any, indent: Optional[int] = 2) -> str:
    """Strict JSON text of ``value`` (see :func:`json_safe`)."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False)


def fmt(value: Any, spec: str = ".4g", missing: str = "n/a") -> str:
    """``value`` formatted with ``spec``; None / NaN / inf as ``missing``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def class_names(dataset, num_classes: int) -> list[str]:
    """The dataset's class names when it has one per class, else ``"class 0"``, ..."""
    names = list(getattr(dataset, "class_names", None) or [])
    return names if len(names) == num_classes else [f"class {i}" for i in range(num_classes)]


def iou_by_class(iou: Sequence[float], names: Sequence[str]) -> dict[str, Optional[float]]:
    """``{class name: IoU}``; None where the class is absent from ground truth and prediction."""
    return {name: (float(v) if math.isfinite(v) else None) for name, v in zip(names, iou)}


def class_table(values: dict[str, Optional[float]], header: str = "IoU",
                absent: str = "absent (not in ground truth or prediction)") -> str:
    """Per-class values as an aligned text table, best first (absent classes last, marked)."""
    width = max([len("class"), *map(len, values)])
    lines = [f"  {'class':<{width}}  {header}"]
    ranked = sorted(values.items(), key=lambda kv: (kv[1] is None, -(kv[1] or 0.0)))
    for name, value in ranked:
        shown = absent if value is None else f"{value:.4f}"
        lines.append(f"  {name:<{width}}  {shown}")
    return "\n".join(lines)


def iou_table(iou: dict[str, Optional[float]]) -> str:
    """Per-class IoU as an aligned text table (absent classes last, marked)."""
    return class_table(iou, "IoU")


def history_segments(history: Iterable[Sequence]) -> list[dict]:
    """The accountant's history ``[(z, q, steps), ...]`` as segments with their step range
    (1-based, inclusive): every noise multiplier z that was used, and for which steps."""
    segments, first = [], 1
    for z, q, steps in history:
        steps = int(steps)
        segments.append({"first_step": first, "last_step": first + steps - 1, "steps": steps,
                         "noise_multiplier": float(z), "sample_rate": float(q)})
        first += steps
    return segments


def used_noise_multiplier(segments: list[dict]) -> Optional[float]:
    """The one z of the run, or None when several were used (or no step was taken)."""
    zs = {s["noise_multiplier"] for s in segments}
    return zs.pop() if len(zs) == 1 else None


def segments_text(segments: list[dict]) -> str:
    """``"z = 1.2 (steps 1-30), z = 1.1 (steps 31-45)"``; every z that was used."""
    if not segments:
        return "no step taken"
    return ", ".join(f"z = {s['noise_multiplier']:.6g} (steps {s['first_step']}-"
                     f"{s['last_step']})" for s in segments)


# --------------------------------------------------------------------------- the run folder

class RunOutputs:
    """Writes the files of one run into ``folder`` (see the module doc).

    ``log_train_loss``: the run releases its training loss (opt-in); only then may a row carry
    :data:`LOSS_COLUMN`."""

    def __init__(self, folder: str | Path, *, log_train_loss: bool = False):
        self.folder = Path(folder)
        self.log_train_loss = bool(log_train_loss)
        self.rows: list[dict] = []
        self._tensorboard = None
        self._pending_config: Optional[str] = None

    def path(self, name: str) -> Path:
        """Path of ``name`` in the run folder, which the first write creates (together with
        the pending config.yaml)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._pending_config is not None:
            text, self._pending_config = self._pending_config, None
            (self.folder / CONFIG_YAML).write_text(text)
        return self.folder / name

    # -- config ------------------------------------------------------------------------------
    def write_config(self, cfg, overrides: Sequence[str] = ()) -> None:
        """config.yaml, written with the run's first result (a run that fails before its first
        epoch ends leaves no folder behind)."""
        from patchdp_opacus.app.config import dump_config

        header = "config of this run (written by patchdp train)"
        if overrides:
            header += "\ncommand-line overrides: " + " ".join(overrides)
        self._pending_config = dump_config(cfg, header)

    # -- per epoch ---------------------------------------------------------------------------
    def restore(self, rows: Sequence[dict]) -> float:
        """Rows of the epochs before a resume (from the checkpoint); a training loss in them is
        dropped unless this run logs it.  Returns the wall-clock seconds they took."""
        dropped = {"train_loss"} | (set() if self.log_train_loss else {LOSS_COLUMN})
        self.rows = [{k: v for k, v in r.items() if k not in dropped} for r in rows]
        return float(self.rows[-1].get("elapsed_seconds") or 0.0) if self.rows else 0.0

    def add_epoch(self, row: dict) -> None:
        """Append ``row`` to metrics.csv (rewritten whole) and TensorBoard."""
        if LOSS_COLUMN in row and not self.log_train_loss:
            raise ValueError(f"{LOSS_COLUMN} in a metrics row without training.log_train_loss")
        self.rows.append(dict(row))
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        with open(self.path(METRICS_CSV), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()}
                             for r in self.rows)
        self._log_tensorboard(row)

    def _log_tensorboard(self, row: dict) -> None:
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the optional extra is not installed: CSV only
                self._tensorboard = False
                return
            self._tensorboard = SummaryWriter(log_dir=str(self.path(TENSORBOARD_DIR)))
        if self._tensorboard is False:
            return
        tags = {"train/lr": "lr"}
        for key in row:
            if key.startswith("epsilon_"):
                tags[f"epsilon/{key[len('epsilon_'):]}_level"] = key
            elif key in EVAL_TAGS:
                tags[EVAL_TAGS[key]] = key
        if self.log_train_loss:
            tags[f"train/{LOSS_COLUMN}"] = LOSS_COLUMN
        for tag, key in tags.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(tag, value, row["steps"])
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard:
            self._tensorboard.close()
        self._tensorboard = None

    # -- end of the run ----------------------------------------------------------------------
    def write_report(self, report: dict) -> dict:
        """``report``: the engine's privacy report plus the run's entries (see
        :func:`run_report`); writes privacy_report.json and .txt and returns the JSON form."""
        report = json_safe(report)
        self.path(REPORT_JSON).write_text(dumps(report) + "\n")
        self.path(REPORT_TXT).write_text("\n".join(report_lines(report)) + "\n")
        return report

    def write_final(self, final: dict) -> None:
        self.path(FINAL_JSON).write_text(dumps(final) + "\n")


#: The relation of a run with ``privacy.accounting: none``.
NON_PRIVATE = "none: non-private training (no clipping, no noise): no privacy claim"


def run_report(engine_report: dict, *, config_name: str, accounting: str, stopped,
               model_changes: dict, device: str, reproducible_noise: bool,
               reproducible_sampling: bool, secure_sampling: bool, log_train_loss: bool,
               overrides: Sequence[str] = ()) -> dict:
    """The engine's report with the run's facts added, and ``noise_multiplier`` replaced by
    the z actually used (None when several were: see ``history_segments``)."""
    report = dict(engine_report)
    segments = history_segments(report.get("history", []))
    used = {s["noise_multiplier"] for s in segments}
    report["history_segments"] = segments
    report["noise_multiplier"] = used_noise_multiplier(segments)
    report["noise_multipliers_used"] = [s["noise_multiplier"] for s in segments]
    target = report.get("target")
    if isinstance(target, dict) and target.get("noise_multiplier") not in used:
        # calibrated for this invocation but never used (e.g. stopped on the budget at once)
        report["target"] = {k: v for k, v in target.items() if k != "noise_multiplier"}
    non_private = report.get("relation") == NON_PRIVATE
    report.update(
        config_name=config_name, accounting_used_for_noise=accounting, stopped=stopped,
        model_changes=model_changes, device=device, config_overrides=list(overrides),
        noise_source="none (non-private)" if non_private else
        NOISE_FROM_SEED if reproducible_noise else NOISE_FROM_OS,
        sampling_source=(SAMPLING_SECURE if secure_sampling else SAMPLING_FROM_SEED
                         if reproducible_sampling else SAMPLING_FROM_OS),
        train_loss=(f"recorded as {LOSS_COLUMN}: {LOSS_NOTE}" if log_train_loss else
                    "not recorded (no statistic of private batches leaves training un-noised)"))
    return report


def report_lines(report: dict) -> list[str]:
    """privacy_report.txt: the claim in words, one fact per line."""
    if report.get("relation") == NON_PRIVATE:
        return [f"privacy report ({report.get('config_name')})", f"relation: {NON_PRIVATE}",
                f"steps = {report.get('steps')}", f"sampling: {report.get('sampling')}"]
    geo = report.get("geometry") or {}
    lines = [
        f"patch-level DP-SGD privacy report ({report.get('config_name')})",
        f"relation: {report.get('relation')}; sampling: {report.get('sampling')}",
        f"{report.get('geometry_description')}; image sizes {geo.get('image_sizes')}; private "
        f"region {geo.get('region')}",
        f"p = {geo.get('inclusion_fraction')} = {geo.get('inclusion_probability')}",
        f"N = {report.get('dataset_size')}, B = {report.get('batch_size')}, "
        f"q = {report.get('sample_rate')}, w = q*p = {report.get('effective_sample_rate')}",
        f"clip norm C = {report.get('max_grad_norm')}, steps = {report.get('steps')}, "
        f"delta = {report.get('delta')}",
        "noise multiplier z used (noise std = z*C), per history segment:",
    ]
    segments = report.get("history_segments") or []
    lines += [f"  steps {s['first_step']}-{s['last_step']}: z = {s['noise_multiplier']} "
              f"(q = {s['sample_rate']})" for s in segments] or ["  (no step taken)"]
    lines += [
        f"epsilon (patch level)  = {fmt(report.get('epsilon_patch'), '', 'unbounded')}",
        f"epsilon (record level) = {fmt(report.get('epsilon_record'), '', 'unbounded')}",
    ]
    orientation = report.get("opacus_orientation")
    if orientation:
        lines.append(f"for orientation only, Opacus-style epsilon = "
                     f"{fmt(orientation.get('epsilon'), '', 'unbounded')} ({orientation['relation']}"
                     f": a different relation and sampling, not comparable to the claims above)")
    if report.get("augmentation"):
        lines += [
            f"{report['augmentation']}, added by the loader to every sample (stored-image "
            f"pixels, before any resampling and normalisation); input sensitivity r = "
            f"{(geo.get('augmentation') or {}).get('sensitivity')}",
            f"TV = {report.get('augmentation_tv')}, w = q*TV = "
            f"{report.get('effective_sample_rate_gaussian_augmentation')}",
            f"epsilon (Gaussian augmentation) = "
            f"{fmt(report.get('epsilon_gaussian_augmentation'), '', 'unbounded')}",
            f"augmentation noise: {report.get('augmentation_source')}",
        ]
    target = report.get("target")
    if isinstance(target, dict):
        lines.append(f"noise calibrated for {target.get('level')}-level epsilon <= "
                     f"{target.get('epsilon')} at delta {target.get('delta')} over "
                     f"{target.get('steps')} steps")
    lines += [f"noise: {report.get('noise_source')}",
              f"sampling: {report.get('sampling_source')}",
              f"training loss: {report.get('train_loss')}"]
    if report.get("stopped"):
        lines.append(f"stopped: {report['stopped']}")
    if geo.get("unchecked_transforms"):
        lines.append(f"UNCHECKED transforms accepted by override: {geo['unchecked_transforms']}")
    return lines

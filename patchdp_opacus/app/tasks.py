"""What differs between the tasks of ``patchdp train``: the data sets, the model, the loss, the
evaluation, the numbers a run records and the figures it draws.  Everything else -- config
validation, the private loader and accountant, the loop, checkpoints, the run folder, the exit
codes -- is one code path (:mod:`patchdp_opacus.app.loop`).

A task is a small object (:class:`Task`); :data:`TASKS` maps the config's ``task`` to it.
Heavy imports happen inside the methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["ClassificationTask", "SegmentationTask", "TASKS", "Task", "task_of"]


@dataclass(frozen=True)
class Task:
    """``metrics``: the metrics.csv columns filled on evaluation epochs (the headline first,
    the one ``patchdp plot`` draws); ``headline``: how it is shown."""

    name: str
    metrics: tuple
    headline: str

    def build_dataset(self, name: str, root, **kwargs):
        raise NotImplementedError

    def build_model(self, cfg, input_size) -> tuple:
        """``(model, CompatReport)`` for inputs of ``input_size`` (the crop, or the image)."""
        raise NotImplementedError

    def criterion(self):
        """The training loss: a mean over samples of a per-sample loss (each sample's
        gradient its own: Opacus' hooks, ghost clipping and bk all need that)."""
        raise NotImplementedError

    def evaluate(self, model, dataset, cfg, device, *, max_images=None,
                 confusion_matrix: bool = False) -> dict:
        raise NotImplementedError

    def final_metrics(self, result: dict, dataset, cfg) -> dict:
        """The task's entries of final_metrics.json from an :meth:`evaluate` result."""
        raise NotImplementedError

    def write_figures(self, out, model, dataset, device, cfg) -> None:
        """Figures of the run folder (none by default)."""

    def summary_lines(self, final: dict) -> list[str]:
        """What ``patchdp train`` prints about the metrics at the end of a run."""
        raise NotImplementedError


def _named(values, names) -> dict[str, Optional[float]]:
    return {n: (float(v) if v is not None and math.isfinite(v) else None)
            for n, v in zip(names, values)}


class SegmentationTask(Task):
    def build_dataset(self, name, root, **kwargs):
        from patchdp_opacus.segmentation.datasets import build_dataset

        return build_dataset(name, root, **kwargs)

    def build_model(self, cfg, input_size):
        from patchdp_opacus.segmentation import train as seg

        return seg.build_segmentation_model(cfg)

    def criterion(self):
        from patchdp_opacus.segmentation.losses import PerImageCrossEntropy

        return PerImageCrossEntropy(reduction="mean")

    def evaluate(self, model, dataset, cfg, device, *, max_images=None,
                 confusion_matrix=False):
        from patchdp_opacus.segmentation import train as seg  # looked up per call

        kwargs = {"confusion_matrix": True} if confusion_matrix else {}
        return seg.evaluate(model, dataset, cfg.model.num_classes, device,
                            batch_size=cfg.training.eval_batch_size, max_images=max_images,
                            **kwargs)

    def final_metrics(self, result, dataset, cfg):
        from patchdp_opacus.app.outputs import class_names

        names = class_names(dataset, cfg.model.num_classes)
        final = {"miou": result["miou"], "pixel_accuracy": result["pixel_accuracy"],
                 "iou": _named(result["iou"], names),
                 "majority_class_miou": result["majority_class_miou"]}
        if "confusion_matrix" in result:
            final["confusion_matrix"] = {"classes": names, "rows_true_columns_predicted":
                                         result["confusion_matrix"]}
        return final

    def write_figures(self, out, model, dataset, device, cfg):
        from patchdp_opacus.app.outputs import class_names
        from patchdp_opacus.segmentation.outputs import write_prediction

        write_prediction(out, model, dataset, device, class_names(dataset,
                                                                  cfg.model.num_classes))

    def summary_lines(self, final):
        from patchdp_opacus.app.outputs import fmt, iou_table

        return [f"mIoU {fmt(final['miou'], '.4f')} (majority-class baseline "
                f"{fmt(final['majority_class_miou'], '.4f')}), pixel accuracy "
                f"{fmt(final['pixel_accuracy'], '.4f')}", "per-class IoU (validation):",
                iou_table(final["iou"])]


class ClassificationTask(Task):
    def build_dataset(self, name, root, **kwargs):
        from patchdp_opacus.classification.datasets import build_dataset

        return build_dataset(name, root, **kwargs)

    def build_model(self, cfg, input_size):
        from patchdp_opacus.classification.train import build_classification_model

        return build_classification_model(cfg, input_size)

    def criterion(self):
        import torch

        return torch.nn.CrossEntropyLoss(reduction="mean")

    def evaluate(self, model, dataset, cfg, device, *, max_images=None,
                 confusion_matrix=False):
        from patchdp_opacus.classification import train as cls  # looked up per call

        return cls.evaluate(model, dataset, cfg.model.num_classes, device,
                            batch_size=cfg.training.eval_batch_size, max_images=max_images,
                            confusion_matrix=confusion_matrix)

    def final_metrics(self, result, dataset, cfg):
        from patchdp_opacus.app.outputs import class_names

        names = class_names(dataset, cfg.model.num_classes)
        final: dict[str, Any] = {
            "accuracy": result["accuracy"],
            "mean_per_class_accuracy": result["mean_per_class_accuracy"],
            "per_class_accuracy": _named(result["per_class_accuracy"], names),
            "majority_class_accuracy": result["majority_class_accuracy"],
            "num_images": result["num_images"]}
        if "confusion_matrix" in result:
            final["confusion_matrix"] = {"classes": names, "rows_true_columns_predicted":
                                         result["confusion_matrix"]}
        return final

    def summary_lines(self, final):
        from patchdp_opacus.app.outputs import class_table, fmt

        return [f"top-1 accuracy {fmt(final['accuracy'], '.4f')} (majority-class baseline "
                f"{fmt(final['majority_class_accuracy'], '.4f')}), mean per-class accuracy "
                f"{fmt(final['mean_per_class_accuracy'], '.4f')} on {final['num_images']} "
                f"whole images", "per-class accuracy:",
                class_table(final["per_class_accuracy"], "accuracy",
                            "absent (no image of this class)")]


TASKS: dict[str, Task] = {
    "segmentation": SegmentationTask("segmentation", ("miou", "pixel_accuracy"), "mIoU"),
    "classification": ClassificationTask("classification",
                                         ("accuracy", "mean_per_class_accuracy"),
                                         "top-1 accuracy"),
}


def task_of(cfg) -> Task:
    return TASKS[cfg.task]

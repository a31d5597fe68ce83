"""Top-1 accuracy, per-class accuracy and the confusion matrix, against hand counts."""

from __future__ import annotations

import math

import pytest
import torch

from patchdp_opacus.classification.metrics import (
    ClassificationMetrics,
    confusion_matrix,
    mean_per_class_accuracy,
    per_class_accuracy,
    top1_accuracy,
)

TARGET = torch.tensor([0, 0, 0, 1, 1, 2])
PRED = torch.tensor([0, 0, 1, 1, 1, 2])  # column sums differ from row sums


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(PRED, TARGET, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    logits = torch.nn.functional.one_hot(PRED, 4).float() * 3 - 1
    assert torch.equal(confusion_matrix(logits, TARGET, 4), cm)


def test_accuracies():
    cm = confusion_matrix(PRED, TARGET, 4)
    assert top1_accuracy(cm) == pytest.approx(5 / 6)
    acc = per_class_accuracy(cm)
    assert acc[:3].tolist() == pytest.approx([2 / 3, 1.0, 1.0]) and math.isnan(acc[3])
    assert mean_per_class_accuracy(cm) == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert math.isnan(top1_accuracy(torch.zeros(3, 3, dtype=torch.int64)))


def test_streaming_metrics_match_one_shot_and_class_255_is_not_ignored():
    metrics = ClassificationMetrics(256)
    metrics.update(torch.tensor([255, 3]), torch.tensor([255, 4]))
    metrics.update(torch.tensor([4]), torch.tensor([4]))
    out = metrics.compute(with_confusion_matrix=True)
    assert out["samples"] == 3 and out["accuracy"] == pytest.approx(2 / 3)
    assert out["confusion_matrix"][255][255] == 1 and out["confusion_matrix"][4][3] == 1
    assert "confusion_matrix" not in metrics.compute()


def test_out_of_range_ids_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        confusion_matrix(torch.tensor([0]), torch.tensor([3]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)

"""Per-image loss and segmentation metrics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from patchdp_opacus.segmentation.losses import PerImageCrossEntropy, per_image_cross_entropy
from patchdp_opacus.segmentation.metrics import (
    ConfusionMatrix,
    confusion_matrix,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
]


def batch(b=3, c=4, h=5, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g)
    target = torch.randint(0, c, (b, h, w), generator=g)
    target[0, 0, :] = 255
    target[1, :2] = 255
    return logits, target


def test_reduction_none_is_per_image_mean_over_valid_pixels():
    logits, target = batch()
    crit = PerImageCrossEntropy()
    crit.reduction = "none"
    out = crit(logits, target)
    assert out.shape == (3,)
    for i in range(3):
        ref = F.cross_entropy(logits[i : i + 1], target[i : i + 1], ignore_index=255)  # mean over valid pixels
        torch.testing.assert_close(out[i], ref)
    crit.reduction = "sum"
    torch.testing.assert_close(crit(logits, target), out.sum())
    crit.reduction = "mean"
    torch.testing.assert_close(crit(logits, target), out.mean())
    assert PerImageCrossEntropy().reduction == "mean"  # what Opacus' ghost clipping expects at wrap time
    crit.reduction = "batchmean"
    with pytest.raises(ValueError, match="reduction"):
        crit(logits, target)


def test_image_without_valid_pixels_contributes_zero():
    logits, target = batch()
    target[2] = 255
    logits.requires_grad_(True)
    out = per_image_cross_entropy(logits, target)
    assert out[2].item() == 0.0 and torch.isfinite(out).all()
    PerImageCrossEntropy()(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[2] == 0)


def test_samples_are_independent():
    logits, target = batch()
    crit = PerImageCrossEntropy(reduction="none")
    base = crit(logits, target)
    logits2, target2 = logits.clone(), target.clone()
    logits2[1] = torch.randn_like(logits2[1]) * 5
    target2[1] = 255
    target2[1, 4, 5] = 2  # image 2 now has a single valid pixel
    changed = crit(logits2, target2)
    assert changed[0] == base[0] and changed[2] == base[2]
    assert changed[1] != base[1]
    # gradient of image 0's loss does not reach other images
    logits.requires_grad_(True)
    crit(logits, target)[0].backward()
    assert torch.all(logits.grad[1:] == 0) and logits.grad[0].abs().sum() > 0


def test_class_weights():
    logits, target = batch()
    w = torch.tensor([1.0, 2.0, 0.5, 3.0])
    out = PerImageCrossEntropy(reduction="none", weight=w)(logits, target)
    for i in range(3):
        ref = F.cross_entropy(logits[i : i + 1], target[i : i + 1], weight=w, ignore_index=255)
        torch.testing.assert_close(out[i], ref)


def test_loss_under_opacus_ghost_clipping():
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8, 6, 6)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, criterion, loader = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, criterion=PerImageCrossEntropy(),
        noise_multiplier=0.0, max_grad_norm=1.0, grad_sample_mode="ghost", poisson_sampling=False,
    )
    x, y = next(iter(loader))
    loss = criterion(model(x), y)
    loss.backward()
    opt.step()
    assert criterion.criterion.reduction == "mean"


# ---------------------------------------------------------------- metrics


def test_confusion_matrix_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    # rows = ground truth, columns = prediction; the 255 pixel is skipped
    expected = torch.tensor([[1, 1, 0, 0], [1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    cm = confusion_matrix(pred[None], target[None], num_classes=4)
    assert cm.dtype == torch.int64
    assert torch.equal(cm, expected)
    assert pixel_accuracy(cm) == pytest.approx(4 / 7)
    iou = per_class_iou(cm)
    # class 0: tp 1, fn 1, fp 2 -> 1/4; class 1: tp 2, fn 1, fp 1 -> 2/4; class 2: tp 1, fn 1, fp 0 -> 1/2
    assert iou[:3].tolist() == pytest.approx([0.25, 0.5, 0.5])
    assert math.isnan(iou[3].item())  # absent from prediction and ground truth
    assert mean_iou(cm) == pytest.approx((0.25 + 0.5 + 0.5) / 3)


def test_predicted_but_absent_class_counts_as_zero():
    target = torch.tensor([[0, 0, 0, 0]])
    pred = torch.tensor([[0, 0, 0, 3]])
    cm = confusion_matrix(pred, target, num_classes=5)
    assert per_class_iou(cm)[3].item() == 0.0
    assert mean_iou(cm) == pytest.approx((3 / 4 + 0.0) / 2)


def test_logits_and_accumulation():
    logits, target = batch(b=4, c=3, seed=3)
    acc = ConfusionMatrix(3)
    acc.update(logits[:2], target[:2])
    acc.update(logits[2:], target[2:])
    full = confusion_matrix(logits.argmax(1), target, 3)
    assert torch.equal(acc.value(), full)
    assert int(full.sum()) == int((target != 255).sum())
    res = acc.compute()
    assert res["miou"] == pytest.approx(mean_iou(full)) and len(res["iou"]) == 3
    acc.reset()
    assert acc.value().sum() == 0 and math.isnan(acc.compute()["pixel_accuracy"])


def test_out_of_range_ids_are_rejected():
    with pytest.raises(ValueError, match="target ids"):
        confusion_matrix(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]), num_classes=3)
    with pytest.raises(ValueError, match="predicted ids"):
        confusion_matrix(torch.tensor([[0, 5]]), torch.tensor([[0, 1]]), num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3), num_classes=3)

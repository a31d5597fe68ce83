"""ResNet-18 / VGG-11 classifiers: Opacus per-sample gradients for every trainable parameter,
BatchNorm frozen for real or removed, small-input adaptation, torchvision's weight path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from patchdp_opacus.classification import models as cls_models
from patchdp_opacus.classification.models import build_classifier
from patchdp_opacus.plugin.compat import FrozenBatchNorm

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

MNIST_KW = dict(norm="none", in_channels=1, small_input=True, normalize="mnist")
DTD_KW = dict(norm="frozen", normalize="imagenet")


def _grad_samples(model, x, y):
    gsm = GradSampleModule(model, loss_reduction="sum")
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    return gsm


@pytest.mark.parametrize("arch,kw,size", [
    ("resnet18", MNIST_KW, 10), ("vgg11", MNIST_KW, 10),       # paper's MNIST (crop 10)
    ("resnet18", DTD_KW, 100),                                  # paper's DTD (frozen BN)
    # VGG-11 with frozen BN: the same layer types as the DTD model, with the 512-wide head of
    # small_input (the 25088x4096 ImageNet head makes per-sample gradients cost ~1 GB here)
    ("vgg11_bn", dict(DTD_KW, small_input=True), 32),
])
def test_every_trainable_parameter_gets_per_sample_gradients(arch, kw, size):
    torch.manual_seed(0)
    model = build_classifier(arch, 10, check_input_size=(size, size), **kw)
    channels = kw.get("in_channels", 3)
    x = torch.randint(0, 256, (3, channels, size, size), dtype=torch.uint8)
    _grad_samples(model, x, torch.tensor([0, 4, 9]))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert getattr(p, "grad_sample", None) is not None, name
        assert p.grad_sample.shape == (3, *p.shape), name
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert getattr(p, "grad_sample", None) is None, name


def test_per_sample_gradients_equal_one_backward_per_sample():
    torch.manual_seed(1)
    model = build_classifier("resnet18", 10, **MNIST_KW).double()
    assert not any(isinstance(m, (nn.Dropout, _BatchNorm)) for m in model.modules())
    x = torch.rand(2, 1, 10, 10, dtype=torch.float64) * 255
    y = torch.tensor([3, 7])
    reference = []
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        reference.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    _grad_samples(model, x, y)
    for n, p in model.named_parameters():
        for i in range(2):
            torch.testing.assert_close(p.grad_sample[i], reference[i][n], rtol=1e-6, atol=1e-9)


def test_frozen_batchnorm_stays_frozen_through_a_private_step():
    torch.manual_seed(2)
    model = build_classifier("resnet18", 47, **DTD_KW)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns and all(isinstance(m, FrozenBatchNorm) for m in bns)
    for m in bns:  # non-trivial statistics, as pretrained weights have
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    x = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8)
    gsm = _grad_samples(model, x, torch.tensor([0, 1, 2, 3]))
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():  # no batch statistics: a sample's logits ignore the rest of the batch
        torch.testing.assert_close(gsm(x)[:1], gsm(x[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11_bn"])
def test_norm_none_removes_and_group_replaces_batchnorm(arch):
    none = build_classifier(arch, 10, norm="none", small_input=True)
    assert not any(isinstance(m, (_BatchNorm, nn.GroupNorm)) for m in none.modules())
    group = build_classifier(arch, 10, norm="group", small_input=True)
    assert not any(isinstance(m, _BatchNorm) for m in group.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in group.modules())


def test_small_inputs_keep_a_spatial_map():
    resnet = build_classifier("resnet18", 10, **MNIST_KW)
    seen = {}

    def record(module, inputs, output):
        seen["layer4"] = output.shape

    resnet.net.layer4.register_forward_hook(record)
    assert resnet(torch.zeros(2, 1, 10, 10)).shape == (2, 10)
    assert seen["layer4"][-2:] == (2, 2)  # overall stride 8; the ImageNet stem leaves 1x1
    vgg = build_classifier("vgg11", 10, **MNIST_KW)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.net.features) == 3
    assert vgg(torch.zeros(2, 1, 28, 28)).shape == (2, 10)  # full images at evaluation too
    with pytest.raises(ValueError, match=r"vgg11 cannot take a 10x10 input; build it with "
                                         r"small_input=True"):
        build_classifier("vgg11", 10, norm="none", check_input_size=(10, 10))


def test_inputs_are_pixel_units_normalised_inside_the_model():
    torch.manual_seed(3)
    model = build_classifier("resnet18", 5, **DTD_KW).eval()
    x = torch.randint(0, 256, (2, 3, 20, 20), dtype=torch.uint8)
    mean, std = cls_models.NORMALIZATIONS["imagenet"]
    manual = (x.float() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model(x), model.net(manual))
    with pytest.raises(ValueError, match="1 channels, the model normalises 3"):
        model(torch.zeros(1, 1, 20, 20))


def test_imagenet_weights_go_through_torchvisions_loader(monkeypatch):
    import torchvision

    for arch in ("resnet18", "vgg11_bn", "vgg11"):  # the names exist in torchvision's registry
        assert torchvision.models.get_model_weights(arch)[cls_models.IMAGENET_WEIGHTS]
    calls = []
    real = torchvision.models.get_model

    def fake(name, weights=None):
        calls.append((name, weights))
        return real(name, weights=None)  # no download in tests

    monkeypatch.setattr(torchvision.models, "get_model", fake)
    build_classifier("resnet18", 47, weights="imagenet", norm="frozen")
    assert calls == [("resnet18", "IMAGENET1K_V1")]


def test_refusals_name_the_argument():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_classifier("resnet50")
    with pytest.raises(ValueError, match="norm must be one of"):
        build_classifier("resnet18", norm="batch")
    with pytest.raises(ValueError, match="in_channels=1 would replace the pretrained"):
        build_classifier("resnet18", weights="imagenet", in_channels=1)
    with pytest.raises(ValueError, match="normalize has 3 channel"):
        build_classifier("resnet18", in_channels=1, normalize="imagenet")

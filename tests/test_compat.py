"""Opacus 1.6 compatibility helper (patchdp_opacus.plugin.compat)."""

import copy
import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torchvision.models import resnet as tv_resnet

from patchdp_opacus.plugin.compat import (
    FrozenBatchNorm,
    IncompatibleModelError,
    OutOfPlaceBasicBlock,
    OutOfPlaceBottleneck,
    freeze_unused_parameters,
    make_private_compatible,
    patch_residual_blocks,
    verify_backward_hooks,
)

# our inputs never require grad, so torch notes that the first hook fires on outputs only
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def tiny_resnet(block=tv_resnet.Bottleneck):
    torch.manual_seed(0)
    width = {"width_per_group": 16} if block is tv_resnet.Bottleneck else {}
    m = tv_resnet.ResNet(block, [1, 1, 1, 1], num_classes=3, **width)
    # non-trivial BN statistics and affine parameters, so equality checks mean something
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.2, 0.2)
    return m


def hooked_backward(model, x):
    """forward/backward with a no-op full backward hook on every leaf module."""
    handles = [m.register_full_backward_hook(lambda *a: None) for m in model.modules() if not list(m.children())]
    try:
        model(x).sum().backward()
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("block", [tv_resnet.BasicBlock, tv_resnet.Bottleneck])
def test_out_of_place_blocks_match_and_survive_hooks(block):
    model = tiny_resnet(block).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    with pytest.raises(RuntimeError):  # the original in-place code breaks full backward hooks
        hooked_backward(copy.deepcopy(model), x)

    fixed, report = make_private_compatible(model, norm="frozen")
    assert fixed is model
    expected_cls = OutOfPlaceBasicBlock if block is tv_resnet.BasicBlock else OutOfPlaceBottleneck
    blocks = [m for m in model.modules() if isinstance(m, block)]
    assert len(blocks) == 4 and all(type(b) is expected_cls for b in blocks)
    assert len(report.residual_blocks_patched) == 4
    assert "relu" in report.inplace_disabled
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    hooked_backward(model, x)  # no error now


def test_timm_blocks_match():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    n = patch_residual_blocks(model)
    assert len(n) == 8 and all("OutOfPlaceTimm" in s for s in n)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_group_norm_policy():
    model = tiny_resnet()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    channels = [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert ModuleValidator.validate(model, strict=False)  # incompatible before
    model, report = make_private_compatible(model, norm="group")
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(gns) == n_bn == len(report.batchnorm_to_groupnorm)
    for gn, c in zip(gns, channels):
        assert gn.num_channels == c and gn.num_groups == math.gcd(32, c)
        assert torch.all(gn.weight == 1) and torch.all(gn.bias == 0)  # fresh affine parameters
    assert ModuleValidator.validate(model, strict=False) == []
    assert "BatchNorm -> GroupNorm: %d" % n_bn in report.summary()
    assert report.as_dict()["norm"] == "group"


def test_frozen_batchnorm_stays_frozen_through_a_train_step():
    model = tiny_resnet()
    keys = set(model.state_dict())
    model, report = make_private_compatible(model, norm="frozen")
    assert set(model.state_dict()) == keys  # checkpoints still load
    bns = [m for m in model.modules() if isinstance(m, FrozenBatchNorm)]
    assert len(bns) == len(report.batchnorm_frozen) > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn_keys = {k for k in before if any(k.startswith(n + ".") for n in report.batchnorm_frozen)}
    assert any(k.endswith("running_mean") for k in bn_keys)

    model.train()
    assert model.training
    assert all(not b.training for b in bns)
    assert all(not p.requires_grad for b in bns for p in b.parameters())

    gsm = GradSampleModule(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, 32, 32) * 3 + 1  # statistics far from the running ones
    gsm(x).square().mean().backward()
    opt.step()
    gsm.train()
    assert all(not b.training for b in bns)

    after = model.state_dict()
    for k in bn_keys:
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in before if k not in bn_keys and not torch.equal(before[k], after[k])]
    assert changed  # the rest of the model did train


def test_frozen_batchnorm_uses_running_stats_even_if_forced_to_train():
    bn = nn.BatchNorm2d(4)
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    holder = nn.Sequential(bn)
    make_private_compatible(holder, norm="frozen")
    bn.training = True  # even a forced flag does not switch to batch statistics
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(holder(x), (x - 1.0) / torch.sqrt(torch.tensor(4.0) + bn.eps))
    assert torch.all(bn.running_mean == 1.0) and bn.num_batches_tracked.item() == 0


def test_frozen_requires_running_stats():
    with pytest.raises(ValueError, match="running statistics"):
        make_private_compatible(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)), norm="frozen")


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.used = nn.Conv2d(4, 2, 1)
        self.unused = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.used(torch.relu(self.body(x)))


def test_freeze_unused_parameters():
    model = TwoHeads()
    model.train()
    names = freeze_unused_parameters(model, torch.randn(1, 3, 8, 8))
    assert names == ["unused.weight", "unused.bias"]
    assert not model.unused.weight.requires_grad and model.used.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())  # trial grads are not left behind
    assert model.training  # mode restored

    model2, report = make_private_compatible(TwoHeads(), example_input=torch.randn(1, 3, 8, 8))
    assert report.frozen_unused_parameters == ["unused.weight", "unused.bias"]
    assert "unused.weight" in report.summary()
    gsm = GradSampleModule(model2)
    gsm(torch.randn(2, 3, 8, 8)).sum().backward()
    for p in model2.parameters():
        assert (getattr(p, "grad_sample", None) is not None) == p.requires_grad


class InplaceResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        out = self.conv(x)
        out += x  # unknown in-place add: cannot be rewritten automatically
        return out


def test_unknown_inplace_op_is_reported():
    with pytest.raises(IncompatibleModelError, match="in-place"):
        verify_backward_hooks(InplaceResidual(), torch.randn(1, 3, 8, 8))
    with pytest.raises(IncompatibleModelError):
        make_private_compatible(InplaceResidual(), example_input=torch.randn(1, 3, 8, 8))


def test_remaining_incompatibility_is_listed():
    class WithLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 4)

    with pytest.raises(IncompatibleModelError, match="LSTM"):
        make_private_compatible(WithLSTM())


def test_unknown_norm_policy():
    with pytest.raises(ValueError, match="norm"):
        make_private_compatible(nn.Linear(2, 2), norm="batch")

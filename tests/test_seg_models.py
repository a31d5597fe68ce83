"""Segmentation models under Opacus hooks (scaled down: resnet18, odd crops)."""

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from patchdp_opacus.plugin.compat import FrozenBatchNorm
from patchdp_opacus.segmentation.losses import PerImageCrossEntropy
from patchdp_opacus.segmentation.models import (
    ARCHITECTURES,
    PaddedSegmentationModel,
    build_model,
    register_architecture,
    required_divisor,
)

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

CROP = (65, 97)  # not divisible by 8, 16 or 32


def per_sample_step(model, batch=2, classes=4):
    torch.manual_seed(1)
    gsm = GradSampleModule(model)  # hooks mode (Opacus default)
    x = torch.randint(0, 256, (batch, 3, *CROP), dtype=torch.uint8)
    y = torch.randint(0, classes, (batch, *CROP))
    y[:, :5] = 255
    out = gsm(x)
    assert out.shape == (batch, classes, *CROP)
    PerImageCrossEntropy()(out, y).backward()
    return gsm


@pytest.mark.parametrize("arch", ["deeplabv3plus", "pspnet"])
@pytest.mark.parametrize("norm", ["group", "frozen"])
def test_every_trainable_parameter_gets_a_per_sample_gradient(arch, norm):
    torch.manual_seed(0)
    model, report = build_model(arch, "resnet18", num_classes=4, output_stride=8, norm=norm, return_report=True)
    assert isinstance(model, PaddedSegmentationModel) and model.divisor == 8
    assert report.residual_blocks_patched and report.inplace_disabled
    if norm == "group":
        assert report.batchnorm_to_groupnorm and not report.batchnorm_frozen
    else:
        assert report.batchnorm_frozen and not report.batchnorm_to_groupnorm
    per_sample_step(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) > 20
    for name, p in trainable:
        gs = getattr(p, "grad_sample", None)
        assert gs is not None, name
        assert gs.shape == (2, *p.shape), name
    # the whole encoder takes part (smp's PSPNet default depth 3 would leave layer3/4 out)
    assert any(n.startswith("net.encoder.layer4") for n, _ in trainable)


def test_frozen_model_keeps_batchnorm_in_eval_mode():
    model = build_model("pspnet", "resnet18", num_classes=3, norm="frozen")
    model.train()
    bns = [m for m in model.modules() if isinstance(m, FrozenBatchNorm)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())


@pytest.mark.parametrize("arch,os_", [("deeplabv3plus", 16), ("pspnet", 16), ("deeplabv3plus", 8)])
def test_padding_wrapper_pads_and_crops(arch, os_):
    torch.manual_seed(0)
    model = build_model(arch, "resnet18", num_classes=3, output_stride=os_).eval()
    assert model.divisor == required_divisor(model.net) == os_
    assert model.padded_size(CROP) == (-(-CROP[0] // os_) * os_, -(-CROP[1] // os_) * os_)
    x = torch.randint(0, 256, (1, 3, *CROP), dtype=torch.uint8)
    with torch.no_grad():
        out = model(x)
        normed = (x.float() - model.pixel_mean) / model.pixel_std
        ph, pw = model.padded_size(CROP)
        padded = F.pad(normed, (0, pw - CROP[1], 0, ph - CROP[0]))  # zeros right/bottom
        ref = model.net(padded)[..., : CROP[0], : CROP[1]]
    assert out.shape == (1, 3, *CROP)
    torch.testing.assert_close(out, ref)
    with pytest.raises(RuntimeError, match="divisible"):
        model.net(normed)  # the bare smp model rejects the odd size


def test_no_normalisation_option_and_float_input():
    torch.manual_seed(0)
    model = build_model("deeplabv3plus", "resnet18", num_classes=2, output_stride=16, normalize=False).eval()
    assert model.pixel_mean is None
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x))


def test_paper_configuration_arguments_reach_smp():
    model = build_model("deeplabv3plus", "resnet18", num_classes=19, output_stride=8, aspp_rates=(6, 12, 18))
    aspp = model.net.decoder.aspp[0]
    dilations = [m[0][0].dilation for m in list(aspp.convs)[1:4]]  # separable conv: depthwise first
    assert dilations == [(6, 6), (12, 12), (18, 18)]
    assert model.net.segmentation_head[0].out_channels == 19
    psp = build_model("pspnet", "resnet18", num_classes=19, output_stride=8)
    enc = psp.net.encoder  # dilated: layer3/4 keep the resolution of layer2
    assert enc.layer3[0].conv1.stride == (1, 1) and enc.layer3[0].conv1.dilation == (2, 2)
    assert enc.layer4[0].conv1.stride == (1, 1) and enc.layer4[1].conv2.dilation == (4, 4)


def test_registry():
    assert {"deeplabv3plus", "pspnet"} <= set(ARCHITECTURES)
    with pytest.raises(KeyError, match="unknown architecture"):
        build_model("unet++-nope", "resnet18")
    with pytest.raises(ValueError, match="already registered"):
        register_architecture("pspnet")(lambda **kw: None)
    with pytest.raises(ValueError, match="output_stride"):
        build_model("deeplabv3plus", "resnet18", output_stride=32)


def test_check_input_size_runs_trial_pass():
    model, report = build_model(
        "pspnet", "resnet18", num_classes=2, output_stride=8, check_input_size=(33, 41), return_report=True
    )
    assert report.frozen_unused_parameters == []
    assert model.training

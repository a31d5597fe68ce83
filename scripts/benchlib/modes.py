"""Models and DP training modes of the training benchmark (``scripts/benchmark_training.py``).

:func:`model_builder` builds the paper's models with random weights (frozen BatchNorms get
calibrated statistics); :class:`Trainer` is one mode (non-private, Opacus hooks, Opacus ghost,
bk) on one random batch, and ``Trainer.step()`` one forward, backward and optimizer step.
"""

from __future__ import annotations

import contextlib
import gc

import torch
from torch import nn

OOM_MARKERS = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED",
               "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")
MODE_KINDS = ("nonprivate", "hooks", "ghost", "bk")

# -- models ---------------------------------------------------------------------------------------

def model_builder(arch: str, encoder: str, output_stride: int, norm: str, num_classes: int):
    """Return a zero-argument function building a fresh Opacus-compatible model (CPU, train mode)
    with ``patchdp_opacus.segmentation.models.build_model``.

    With ``norm="frozen"`` and random weights, frozen BatchNorms would be identity maps and the
    activations of a ResNet-101 grow by orders of magnitude until a plain SGD step diverges (a
    non-finite loss). Pretrained statistics normalise; here each frozen BatchNorm gets the
    per-channel mean and variance of its input on one random batch (:func:`calibrate_frozen_bn`,
    computed once, copied into every build). The cost of a step is the same either way."""
    from patchdp_opacus.segmentation.models import build_model

    stats = {}

    def make():
        net = build_model(arch, encoder_name=encoder, encoder_weights=None,
                          num_classes=num_classes, output_stride=output_stride, norm=norm)
        if norm == "frozen":
            if not stats:
                stats.update(calibrate_frozen_bn(net))
            buffers = dict(net.named_buffers())
            with torch.no_grad():
                for name, value in stats.items():
                    buffers[name].copy_(value)
        return net

    return make


def calibrate_frozen_bn(net: nn.Module, crop: int = 129, batch: int = 2, seed: int = 0) -> dict:
    """Set every frozen BatchNorm's running mean/variance to those of its input on one random
    batch (pixels uniform in [0, 255], one forward pass in eval mode, in layer order, so each
    layer sees inputs already normalised by the layers before it); return the new buffers by
    name."""
    from torch.nn.modules.batchnorm import _BatchNorm

    def set_stats(module, inputs):
        x = inputs[0].transpose(0, 1).flatten(1)  # (C, N*H*W)
        module.running_mean.copy_(x.mean(1))
        module.running_var.copy_(x.var(1, unbiased=False))

    norms = {name: m for name, m in net.named_modules() if isinstance(m, _BatchNorm)}
    handles = [m.register_forward_pre_hook(set_stats) for m in norms.values()]
    gen = torch.Generator().manual_seed(seed)
    was_training = net.training
    net.eval()  # dropout off: deterministic, and no draws from the global RNG
    try:
        with torch.no_grad():
            net(torch.rand(batch, 3, crop, crop, generator=gen) * 255)
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return {f"{name}.{buf}": getattr(m, buf).clone() for name, m in norms.items()
            for buf in ("running_mean", "running_var")}


def per_image_loss():
    from patchdp_opacus.segmentation.losses import PerImageCrossEntropy
    return PerImageCrossEntropy(reduction="mean")


# -- one mode -------------------------------------------------------------------------------------

def parse_mode(spec: str):
    """``"bk:storage=recompute,conv_backend=unfold"`` -> ("bk", {"storage": "recompute", ...})."""
    kind, _, rest = spec.partition(":")
    if kind not in MODE_KINDS:
        raise ValueError(f"unknown mode {spec!r}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if value.lower() in ("true", "false"):
            options[key] = value.lower() == "true"
        elif value.isdigit():
            options[key] = int(value)
        else:
            options[key] = value
    if options and kind != "bk":
        raise ValueError(f"options are only for bk modes: {spec!r}")
    return kind, options


class Trainer:
    """A model + optimizer + loss for one mode, and ``step()`` = forward, backward, DP step."""

    def __init__(self, spec, make_model, batch, args, device, *, noise=None, channels_last=None,
                 model=None):
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        from patchdp_opacus.fast import FAST_MODES

        self.kind, options = parse_mode(spec)
        channels_last = args.channels_last if channels_last is None else channels_last
        z = args.noise_multiplier if noise is None else noise
        C = args.max_grad_norm
        model = (make_model() if model is None else model).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        criterion = per_image_loss().to(device)
        self.loss_fn = criterion
        if self.kind == "nonprivate":
            self.net = model
        elif self.kind == "hooks":
            self.net = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        elif self.kind == "ghost":
            self.net = GradSampleModuleFastGradientClipping(
                model, batch_first=True, loss_reduction="mean", max_grad_norm=C,
                use_ghost_clipping=True)
        else:
            self.net = FAST_MODES["bk"].wrap_model(model, batch_first=True, loss_reduction="mean",
                                                   max_grad_norm=C, **options)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.max_grad_norm = C
        sgd = torch.optim.SGD(self.params, lr=args.lr, momentum=0.9)
        dp = dict(noise_multiplier=z, max_grad_norm=C, expected_batch_size=batch,
                  loss_reduction="mean")
        if self.kind == "nonprivate":
            self.opt = sgd
        elif self.kind == "hooks":
            self.opt = DPOptimizer(sgd, **dp)
        elif self.kind == "ghost":
            self.opt = DPOptimizerFastGradientClipping(sgd, **dp)
            self.loss_fn = DPLossFastGradientClipping(self.net, self.opt, criterion, "mean")
        else:
            self.opt = FAST_MODES["bk"].optimizer_cls(sgd, **dp)
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        shape = (batch, 3, args.crop, args.crop)
        self.x = (torch.rand(shape, generator=gen) * 255).to(device)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, args.num_classes, (batch, args.crop, args.crop),
                               generator=gen).to(device)
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 \
            else contextlib.nullcontext

    def step(self, apply: bool = True):
        with self.autocast():
            out = self.net(self.x)
            loss = self.loss_fn(out, self.y)
        loss.backward()
        if apply:
            if self.kind == "nonprivate":
                # the batch gradient's norm clipped to C (one fused norm; well under 1% of a
                # step): random-weight frozen-BatchNorm ResNets have gradient norms ~1e4 and
                # diverge in one plain SGD step
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return loss

    def plan_summary(self):
        if self.kind != "bk":
            return None
        counts = {}
        for plan in self.net.layer_plans().values():
            key = f"{plan.norm}/{plan.storage}"
            counts[key] = counts.get(key, 0) + 1
        return counts


# -- device helpers ---------------------------------------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in OOM_MARKERS)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

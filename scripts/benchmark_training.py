#!/usr/bin/env python
"""Training throughput of DP-SGD per-sample clipping modes against non-private training.

One process; for each architecture (smp DeepLabV3+ / dilated PSPNet, ResNet-101, output stride 8,
built by ``patchdp_opacus.segmentation.models.build_model``) and BatchNorm policy ("frozen" or
"group"), each mode is run on random data at crop ``--crop`` (505) at the largest physical batch
that fits (doubling, then bisection on CUDA out-of-memory; or the ``--batch`` list), with the same
precision for all modes (fp32, or ``--bf16`` autocast). Modes:

* ``nonprivate``  SGD step on the batch gradient, its total norm clipped to ``--max-grad-norm``
                  (keeps random-weight frozen-BN models finite; a fused norm, negligible cost);
* ``hooks``       Opacus ``GradSampleModule`` + ``DPOptimizer`` (materialised per-sample grads);
* ``ghost``       Opacus ghost clipping (``GradSampleModuleFastGradientClipping``, two backward
                  passes; conv layers still instantiate per-sample gradients);
* ``bk``          ``patchdp_opacus.fast`` book-keeping mode; ``bk:key=value+key=value`` passes
                  :class:`~patchdp_opacus.fast.BKOptions` fields, e.g. ``bk:storage=recompute``,
                  ``bk:conv_backend=unfold`` (or ``loop``), ``bk:skip_weight_grad=false``.

A DP step is one forward, backward and optimizer step (clip, noise, update) of one physical
batch, which is also the logical batch here. Prints a table (img/s, peak memory, physical batch,
ratio to non-private of the same model) and writes JSON (``--out``) after every measurement, so
a run cut short keeps what it measured.

    # H100, the paper's grid (about 2-4 min per model/norm pair; split with --archs/--norms)
    python scripts/benchmark_training.py --out bench.json
    python scripts/benchmark_training.py --archs deeplabv3plus --norms group \\
        --modes nonprivate,bk,bk:conv_backend=unfold,bk:storage=recompute --check
    # first thing to measure: per-layer cost of bk's per-sample work vs the weight gradient
    python scripts/benchmark_training.py --modes '' --layer-bench 8
    # CPU smoke test (ResNet-18 encoder, crop 64, batch 2)
    python scripts/benchmark_training.py --device cpu --tiny
    # the README table from saved reports
    python scripts/benchmark_training.py --markdown deeplab.json pspnet.json

On a bare GPU machine, ``scripts/gpu_benchmark.sh`` installs the carried wheels (fetched here by
``scripts/device_wheels.sh``) and runs one stage that fits a 10-minute call.

Notes: Opacus 1.6 hooks/ghost modes compute wrong conv per-sample gradients for channels_last
activations (their ``unfold2d`` assumes NCHW strides): with ``--channels-last`` their timings are
reported but their clipping is not correct. ``--check`` compares bk's clipped gradient with
Opacus hooks' (noise 0, NCHW, dropout off) on one small batch of the real model first.
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

logger = logging.getLogger("benchmark_training")

DEFAULT_MODES = "nonprivate,hooks,ghost,bk"
OOM_MARKERS = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED",
               "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE")


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
    if kind not in ("nonprivate", "hooks", "ghost", "bk"):
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


# -- measurement ----------------------------------------------------------------------------------

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


def run_iterations(spec, make_model, batch, args, device, warmup, iters):
    """Build a fresh trainer, run ``warmup`` then ``iters`` timed steps. Returns a dict, or None
    on out-of-memory. Other exceptions propagate."""
    trainer = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(spec, make_model, batch, args, device)
        for _ in range(warmup):
            trainer.step()
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            loss = trainer.step()
        sync(device)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss.detach().float()).all():
            raise RuntimeError(f"{spec}: non-finite loss")
        result = {
            "batch": batch,
            "seconds_per_step": elapsed / max(1, iters),
            "img_per_s": batch * iters / elapsed if iters else None,
            "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                         if device.type == "cuda" else None),
            "plans": trainer.plan_summary(),
        }
        return result
    except Exception as exc:  # noqa: BLE001 - OOM is an expected outcome of a probe
        if not is_oom(exc):
            raise
        return None
    finally:
        trainer = None
        free(device)


def largest_batch(spec, make_model, args, device, log):
    """Largest physical batch in [1, --max-batch] that runs ``--probe-iters`` steps: doubling,
    then bisection. Returns (batch, probes)."""
    probes = {}

    def fits(b):
        if b not in probes:
            t = time.perf_counter()
            probes[b] = run_iterations(spec, make_model, b, args, device, args.probe_iters, 0) \
                is not None
            log(f"    probe batch {b}: {'fits' if probes[b] else 'OOM'} "
                f"({time.perf_counter() - t:.1f}s)")
        return probes[b]

    lo, hi, b = 0, None, max(1, args.min_batch)
    while b <= args.max_batch:
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        hi = args.max_batch + 1
        if lo < args.max_batch and fits(args.max_batch):
            lo = args.max_batch
    while hi - lo > max(1, args.batch_resolution):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


def check_against_hooks(make_model, args, device, log):
    """Max relative error of bk's clipped gradient (z = 0) against Opacus hooks on one small
    batch of the real model (NCHW for hooks; dropout off; same weights and data)."""
    torch.manual_seed(args.seed)
    base = make_model()
    for m in base.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    grads, norms = {}, {}
    for spec, cl in (("hooks", False), ("bk", args.channels_last)):
        tr = Trainer(spec, None, args.check_batch, args, device, noise=0.0, channels_last=cl,
                     model=copy.deepcopy(base))
        tr.step(apply=False)
        if spec == "hooks":
            norms[spec] = torch.stack([p.grad_sample.reshape(args.check_batch, -1).float()
                                       .norm(dim=1) for p in tr.net.parameters()
                                       if p.requires_grad], 1).norm(dim=1)
        else:
            norms[spec] = tr.net.per_sample_norms()
        tr.opt.pre_step()
        grads[spec] = {n: p.grad.detach().float().clone()
                       for n, p in tr.net.named_parameters() if p.requires_grad}
        del tr
        free(device)
    worst = max(((grads["bk"][n] - g).norm() / g.norm().clamp_min(1e-30)).item()
                for n, g in grads["hooks"].items())
    norm_err = ((norms["bk"] - norms["hooks"]).norm() / norms["hooks"].norm()).item()
    log(f"    check bk vs hooks: per-sample norm rel err {norm_err:.2e}, worst parameter "
        f"gradient rel err {worst:.2e} (norms {norms['hooks'].tolist()})")
    return {"norm_rel_err": norm_err, "grad_rel_err_max": worst,
            "norms": norms["hooks"].tolist()}


# -- per-layer micro-benchmark ---------------------------------------------------------------------

def _timer(device, reps):
    """Median milliseconds of ``fn()`` over ``reps`` runs after one warm-up run."""

    def run(fn):
        fn()
        sync(device)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]

    return run


def layer_bench(make_model, args, device, batch, log):
    """Per trainable Conv2d/GroupNorm of the real model at ``batch`` x crop: time the ordinary
    weight gradient (what non-private training pays and bk skips) against bk's per-layer work
    in the backward hook, for each conv backend, and the step-time clipped sum. Shapes come
    from one no-grad forward; tensors are random."""
    from torch.nn.grad import conv2d_weight

    from patchdp_opacus.fast.layers import BKOptions, ConvRule, GroupNormRule, _weighted_sum

    model = make_model().to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    seen = {}

    def hook(module, inputs, output):
        key = (id(module), tuple(inputs[0].shape), tuple(output.shape))
        seen.setdefault(key, [module, inputs[0].shape, output.shape, 0])[3] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.GroupNorm)) and m.weight is not None
               and m.weight.requires_grad]
    x = torch.rand(1, 3, args.crop, args.crop, device=device) * 255
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    timer = _timer(device, args.layer_reps)
    groups = {}
    for module, in_shape, out_shape, count in seen.values():
        if isinstance(module, nn.Conv2d):
            cfg = ("conv", module.in_channels, module.out_channels, module.kernel_size,
                   module.stride, module.dilation, module.groups, tuple(in_shape[2:]),
                   tuple(out_shape[2:]))
        else:
            cfg = ("gn", module.num_channels, module.num_groups, tuple(in_shape[2:]))
        groups.setdefault(cfg, [module, in_shape, out_shape, 0])[3] += count
    rows, totals = [], {}
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    for cfg, (module, in_shape, out_shape, count) in sorted(groups.items(), key=str):
        act = torch.randn(batch, *in_shape[1:], device=device, dtype=dtype).contiguous(
            memory_format=fmt)
        grad = torch.randn(batch, *out_shape[1:], device=device, dtype=dtype).contiguous(
            memory_format=fmt)
        params = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        row = {"layer": str(cfg), "count": count}
        try:
            if cfg[0] == "conv":
                rule = ConvRule()
                w_shape = module.weight.shape
                row["wgrad_ms"] = timer(lambda: conv2d_weight(
                    act, w_shape, grad, module.stride, module.padding, module.dilation,
                    module.groups))
                for backend in ("grouped", "unfold", "loop"):
                    opts = BKOptions(conv_backend=backend)
                    plan, _, kept, _ = rule.backward(module, act, grad, params, opts)
                    row["plan"] = f"{plan.norm}/{plan.storage} T={plan.positions}"
                    row[f"bk_{backend}_ms"] = timer(
                        lambda: rule.backward(module, act, grad, params, opts))
                w = torch.rand(batch, device=device)
                if plan.storage == "keep":
                    row["step_ms"] = timer(lambda: [_weighted_sum(w, t, torch.float32)
                                                    for t in kept.values()])
                else:
                    row["step_ms"] = timer(lambda: rule.recompute(module, act, grad, w,
                                                                   torch.float32))

            else:
                rule = GroupNormRule()
                opts = BKOptions()
                row["plan"] = "direct/keep"
                row["bk_grouped_ms"] = row["bk_unfold_ms"] = row["bk_loop_ms"] = timer(
                    lambda: rule.backward(module, act, grad, params, opts))
                row["wgrad_ms"] = timer(lambda: torch.ops.aten.native_group_norm_backward(
                    grad, act, *_gn_stats(act, module), module.weight, act.shape[0],
                    act.shape[1], act[0, 0].numel(), module.num_groups, (False, True, True)))
                row["step_ms"] = 0.0
        except Exception as exc:  # noqa: BLE001 - OOM or an unsupported shape: report, go on
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            free(device)
        for key in ("wgrad_ms", "bk_grouped_ms", "bk_unfold_ms", "bk_loop_ms", "step_ms"):
            if key in row:
                totals[key] = totals.get(key, 0.0) + row[key] * count
        rows.append(row)
        act = grad = kept = None  # free before the next layer
        free(device)
    rows.sort(key=lambda r: -r.get("bk_grouped_ms", 0) * r["count"])
    log(f"  layer bench, batch {batch}: totals per step (ms): "
        + ", ".join(f"{k[:-3]} {v:.1f}" for k, v in totals.items()))
    for r in rows[: args.layer_top]:
        log("    " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in r.items()))
    return {"batch": batch, "totals_ms": totals, "layers": rows}


def _gn_stats(act, module):
    """(mean, rstd) of GroupNorm, shapes (N, G), for native_group_norm_backward."""
    n = act.shape[0]
    var, mean = torch.var_mean(act.float().reshape(n, module.num_groups, -1), dim=-1,
                               correction=0)
    return mean.to(act.dtype), (var + module.eps).rsqrt().to(act.dtype)


# -- main -----------------------------------------------------------------------------------------

def environment(device):
    import opacus
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "opacus": opacus.__version__, "device": str(device),
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "threads": torch.get_num_threads()}
    try:
        import segmentation_models_pytorch as smp
        env["smp"] = smp.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="deeplabv3plus,pspnet")
    p.add_argument("--norms", default="frozen,group")
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help=f"comma list; bk options after a colon joined by '+', e.g. "
                        f"bk:storage=recompute+conv_backend=unfold (default {DEFAULT_MODES})")
    p.add_argument("--encoder", default="resnet101")
    p.add_argument("--output-stride", type=int, default=8)
    p.add_argument("--crop", type=int, default=505)
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--device", default="cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for every mode")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", choices=("default", "on", "off"), default="default",
                   help="TF32 for cuDNN convs and matmuls (default: PyTorch's, i.e. convs on, "
                        "matmuls off)")
    p.add_argument("--no-cudnn-benchmark", action="store_true")
    p.add_argument("--batch", default=None,
                   help="comma list of physical batches to measure instead of the OOM search")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-resolution", type=int, default=1,
                   help="stop bisecting when the bracket is this narrow")
    p.add_argument("--probe-iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--max-grad-norm", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--check", action="store_true",
                   help="compare bk with Opacus hooks (z=0) on --check-batch images first")
    p.add_argument("--check-batch", type=int, default=2)
    p.add_argument("--layer-bench", type=int, default=None, metavar="BATCH",
                   help="time per-layer ordinary weight gradients against bk's per-sample work "
                        "at this batch (before the modes; --modes '' to run it alone)")
    p.add_argument("--layer-reps", type=int, default=5)
    p.add_argument("--layer-top", type=int, default=12, help="layers to print")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds; start no new measurement after this")
    p.add_argument("--tiny", action="store_true",
                   help="smoke mode: resnet18 encoder, crop 64, batch 2, 1 warm-up + 2 steps, "
                        "--check")
    p.add_argument("--out", default=None, help="JSON file (rewritten after every measurement)")
    p.add_argument("--markdown", nargs="+", default=None, metavar="JSON",
                   help="print the README table (Markdown) of these saved reports and exit")
    args = p.parse_args(argv)
    if args.tiny:  # smoke-mode defaults; flags given explicitly still win
        p.set_defaults(encoder="resnet18", crop=64, batch="2", warmup=1, iters=2, check=True,
                       layer_bench=2, layer_reps=1, layer_top=4,
                       threads=1 if args.device == "cpu" else None)
        args = p.parse_args(argv)
    # '+' joins bk options inside one comma-separated mode list entry
    args.mode_list = [m.replace("+", ",") for m in args.modes.split(",") if m]
    args.batches = [int(b) for b in args.batch.split(",")] if args.batch else None
    return args


def markdown_table(reports) -> str:
    """A Markdown table of measured rows: device, precision, model, mode, physical batch, img/s,
    peak memory and the ratio to the non-private row of the same model, device and precision."""
    lines = ["| device | precision | model | norm | mode | physical batch | img/s | peak GiB "
             "| ratio to non-private |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for rep in reports:
        cfg, env = rep["config"], rep["env"]
        device = env.get("gpu") or f"CPU, torch threads {env['threads']}"
        precision = "bf16 autocast" if cfg.get("bf16") else "fp32"
        if cfg.get("channels_last"):
            precision += ", channels_last"
        model = f"{{}} {cfg['encoder']} OS{cfg['output_stride']} crop {cfg['crop']}"
        for r in rep["results"]:
            if r.get("img_per_s") is None:
                continue
            peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
            ratio = (f"{r['ratio_to_nonprivate']:.2f}×" if r.get("ratio_to_nonprivate")
                     else "n/a")
            lines.append(f"| {device} | {precision} | {model.format(r['arch'])} | {r['norm']} "
                         f"| {r['mode']} | {r['batch']} | {r['img_per_s']:.3g} | {peak} "
                         f"| {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        reports = []
        for path in args.markdown:
            with open(path) as fh:
                reports.append(json.load(fh))
        print(markdown_table(reports))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # build_model warns on every build that frozen BatchNorms without pretrained weights are
    # identity maps; model_builder gives them calibrated statistics instead
    logging.getLogger("patchdp_opacus.segmentation.models").setLevel(logging.ERROR)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu (--tiny for the smoke test)",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32 != "default":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark and device.type == "cuda"
    for spec in args.mode_list:
        parse_mode(spec)  # fail early on a typo
    if args.channels_last and any(parse_mode(m)[0] in ("hooks", "ghost") for m in args.mode_list):
        logger.warning("--channels-last: Opacus 1.6 hooks/ghost per-sample conv gradients are wrong "
                       "for channels_last activations; their timings are still reported")

    report = {"config": {k: v for k, v in vars(args).items()}, "env": environment(device),
              "results": [], "checks": [], "layer_bench": []}
    started = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    def save():
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(report, fh, indent=2)

    log(f"# {report['env'].get('gpu', report['env']['device'])}  torch {torch.__version__}  "
        f"precision {'bf16 autocast' if args.bf16 else 'fp32'}  channels_last "
        f"{args.channels_last}  crop {args.crop}  encoder {args.encoder} OS{args.output_stride}")
    for arch in args.archs.split(","):
        for norm in args.norms.split(","):
            make_model = model_builder(arch, args.encoder, args.output_stride, norm,
                                       args.num_classes)
            log(f"## {arch} / {norm}")
            def record(key, what, measure):
                """Run one side measurement; a failure is logged and recorded, not raised."""
                try:
                    found = measure()
                except Exception as exc:  # noqa: BLE001 - keep benchmarking the modes
                    found = {"error": f"{type(exc).__name__}: {exc}"}
                    log(f"    {what} failed: {found['error']}")
                    free(device)
                report[key].append({"arch": arch, "norm": norm, **found})
                save()

            if args.layer_bench:
                record("layer_bench", "layer bench",
                       lambda: layer_bench(make_model, args, device, args.layer_bench, log))
            if args.check:
                record("checks", "check",
                       lambda: check_against_hooks(make_model, args, device, log))
            for spec in args.mode_list:
                row = {"arch": arch, "norm": norm, "mode": spec}
                if args.time_limit and time.perf_counter() - started > args.time_limit:
                    row["error"] = "skipped: --time-limit reached"
                    report["results"].append(row)
                    continue
                log(f"  {spec}")
                try:
                    if args.batches:
                        measured = [run_iterations(spec, make_model, b, args, device,
                                                   args.warmup, args.iters)
                                    for b in args.batches]
                        ok = [m for m in measured if m is not None]
                        row["oom_batches"] = [b for b, m in zip(args.batches, measured) if m is None]
                        row["all"] = ok
                        best = max(ok, key=lambda m: m["batch"]) if ok else None
                    else:
                        batch, probes = largest_batch(spec, make_model, args, device, log)
                        row["probes"] = {str(k): v for k, v in sorted(probes.items())}
                        best = run_iterations(spec, make_model, batch, args, device, args.warmup,
                                              args.iters) if batch else None
                    if best is None:
                        row["error"] = "out of memory at every batch tried"
                    else:
                        row.update(best)
                except Exception as exc:  # noqa: BLE001 - keep benchmarking other modes
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    row["traceback"] = traceback.format_exc(limit=6)
                    free(device)
                if "img_per_s" in row:
                    log(f"    batch {row['batch']}: {row['img_per_s']:.2f} img/s"
                        + (f", peak {row['peak_gib']:.1f} GiB" if row.get("peak_gib") else "")
                        + (f", plans {row['plans']}" if row.get("plans") else ""))
                else:
                    log(f"    {row['error']}")
                report["results"].append(row)
                save()

    # ratios to the non-private row of the same model
    base = {(r["arch"], r["norm"]): r.get("img_per_s") for r in report["results"]
            if r["mode"] == "nonprivate"}
    for r in report["results"]:
        ref = base.get((r["arch"], r["norm"]))
        r["ratio_to_nonprivate"] = (r["img_per_s"] / ref) if ref and r.get("img_per_s") else None
    save()

    log("")
    header = f"{'arch':<14}{'norm':<8}{'mode':<34}{'batch':>6}{'img/s':>10}{'peak GiB':>10}{'ratio':>8}"
    log(header)
    log("-" * len(header))
    for r in report["results"]:
        if r.get("img_per_s") is None:
            log(f"{r['arch']:<14}{r['norm']:<8}{r['mode']:<34}  {r.get('error', '')[:60]}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        ratio = f"{r['ratio_to_nonprivate']:.2f}" if r["ratio_to_nonprivate"] else "n/a"
        log(f"{r['arch']:<14}{r['norm']:<8}{r['mode']:<34}{r['batch']:>6}{r['img_per_s']:>10.2f}"
            f"{peak:>10}{ratio:>8}")
    for c in report["checks"]:
        if "error" in c:
            log(f"check {c['arch']}/{c['norm']}: {c['error']}")
        else:
            log(f"check {c['arch']}/{c['norm']}: bk vs Opacus hooks, norms rel err "
                f"{c['norm_rel_err']:.1e}, clipped-gradient rel err {c['grad_rel_err_max']:.1e}")
    failed = [r for r in report["results"] if r.get("error") and "skipped" not in r["error"]
              and "out of memory" not in r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

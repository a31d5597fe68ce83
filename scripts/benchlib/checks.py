"""Side measurements of the training benchmark: bk against Opacus hooks on the real model
(:func:`check_against_hooks`) and the per-layer cost of bk's per-sample work
(:func:`layer_bench`)."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from benchlib.modes import Trainer, free, sync

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

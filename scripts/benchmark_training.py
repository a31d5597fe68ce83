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

``--memory-batches 1,2`` first measures the peak memory of one step of every mode at each of
these batches, each in a fresh process (peak resident set on CPU, ``max_memory_allocated`` on
CUDA; ``benchlib/memory.py``), and fits memory per sample and the fixed part, with the largest
physical batch in ``--memory-budget-gb`` (80) GB: the batch a GPU could take, measured without
one. ``--iters 0`` measures memory only.

Layout: this file holds the command line and the timing loop; ``benchlib/modes.py`` the models
and the :class:`Trainer` of each mode, ``benchlib/checks.py`` the bk-vs-hooks check and the
per-layer bench, ``benchlib/memory.py`` the memory measurement, ``benchlib/report.py`` the
tables.

    # H100, the paper's grid (about 2-4 min per model/norm pair; split with --archs/--norms)
    python scripts/benchmark_training.py --out bench.json
    python scripts/benchmark_training.py --archs deeplabv3plus --norms group \\
        --modes nonprivate,bk,bk:conv_backend=unfold,bk:storage=recompute --check
    # first thing to measure: per-layer cost of bk's per-sample work vs the weight gradient
    python scripts/benchmark_training.py --modes '' --layer-bench 8
    # CPU smoke test (ResNet-18 encoder, crop 64, batch 2)
    python scripts/benchmark_training.py --device cpu --tiny
    # CPU at the paper's crop: throughput at batch 2, and memory per sample from batches 1 and 2
    python scripts/benchmark_training.py --device cpu --threads 2 --batch 2 --warmup 1 \\
        --iters 2 --memory-batches 1,2
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
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/benchlib, also when imported

from benchlib.checks import check_against_hooks, layer_bench  # noqa: E402
from benchlib.memory import add_ratios as add_memory_ratios  # noqa: E402
from benchlib.memory import measure_memory  # noqa: E402
from benchlib.modes import (  # noqa: E402,F401  (re-exported for tests and notebooks)
    Trainer,
    calibrate_frozen_bn,
    free,
    is_oom,
    model_builder,
    parse_mode,
    sync,
)
from benchlib.report import markdown_table, memory_table, summary_lines  # noqa: E402

logger = logging.getLogger("benchmark_training")

DEFAULT_MODES = "nonprivate,hooks,ghost,bk"


# -- measurement ----------------------------------------------------------------------------------

def run_iterations(spec, make_model, batch, args, device, warmup, iters):
    """Build a fresh trainer, run ``warmup`` then ``iters`` timed steps. Returns a dict, or None
    on out-of-memory. Other exceptions propagate."""
    trainer = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(spec, make_model, batch, args, device)
        loss = None
        for _ in range(warmup):
            loss = trainer.step()
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(iters):
            loss = trainer.step()
        sync(device)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if loss is not None and not torch.isfinite(loss.detach().float()).all():
            raise RuntimeError(f"{spec}: non-finite loss")
        result = {
            "batch": batch,
            "seconds_per_step": elapsed / max(1, iters),
            "img_per_s": batch * iters / elapsed if iters else None,
            # CPU time of this process (all its threads): on a CPU shared with other jobs it
            # counts the work of a step, where the wall clock also counts the waiting
            "cpu_seconds_per_step": cpu / max(1, iters),
            "img_per_cpu_s": batch * iters / cpu if iters and cpu > 0 else None,
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


def add_speed_ratios(results: list, *, cpu: bool) -> None:
    """Ratios to the non-private row of the same model: ``ratio_to_nonprivate`` (wall clock)
    and, on a CPU, ``cpu_time_ratio_to_nonprivate`` (process CPU time, robust to other jobs
    on the machine)."""
    keys = [("img_per_s", "ratio_to_nonprivate")]
    if cpu:
        keys.append(("img_per_cpu_s", "cpu_time_ratio_to_nonprivate"))
    for key, ratio in keys:
        base = {(r["arch"], r["norm"]): r.get(key) for r in results if r["mode"] == "nonprivate"}
        for r in results:
            ref = base.get((r["arch"], r["norm"]))
            r[ratio] = r[key] / ref if ref and r.get(key) else None


def time_mode(spec, make_model, args, device, log) -> dict:
    """Throughput of one mode: at each ``--batch`` or at the largest batch that fits."""
    row = {}
    try:
        if args.batches:
            measured = [run_iterations(spec, make_model, b, args, device, args.warmup, args.iters)
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
    return row


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
    p.add_argument("--memory-batches", default=None, metavar="B1,B2",
                   help="peak memory of one step per mode at these physical batches, each in a "
                        "fresh process (benchlib/memory.py), before the timings; --iters 0 for "
                        "memory only")
    p.add_argument("--memory-budget-gb", type=float, default=80.0,
                   help="report the largest physical batch whose fitted peak fits this many GB "
                        "(10^9 bytes)")
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
    args.memory_batches = ([int(b) for b in args.memory_batches.split(",")]
                           if args.memory_batches else None)
    return args



def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        reports = []
        for path in args.markdown:
            with open(path) as fh:
                reports.append(json.load(fh))
        print(markdown_table(reports))
        if any(rep.get("memory") for rep in reports):
            print()
            print(memory_table(reports))
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
              "results": [], "checks": [], "layer_bench": [], "memory": []}
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
            if args.memory_batches:
                for spec in args.mode_list:
                    log(f"  {spec}: memory of one step, one process per batch")
                    report["memory"].append(measure_memory(spec, arch, norm, args, log))
                    add_memory_ratios(report["memory"])
                    save()
            for spec in args.mode_list:
                if args.iters == 0:
                    break
                row = {"arch": arch, "norm": norm, "mode": spec}
                if args.time_limit and time.perf_counter() - started > args.time_limit:
                    row["error"] = "skipped: --time-limit reached"
                else:
                    log(f"  {spec}")
                    row.update(time_mode(spec, make_model, args, device, log))
                report["results"].append(row)
                add_speed_ratios(report["results"], cpu=device.type == "cpu")
                save()

    add_speed_ratios(report["results"], cpu=device.type == "cpu")
    save()

    log("")
    for line in summary_lines(report):
        log(line)
    failed = [r for r in report["results"] if r.get("error") and "skipped" not in r["error"]
              and "out of memory" not in r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

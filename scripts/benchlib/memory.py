"""Peak memory of one DP step per mode, each measurement in a fresh process.

For a mode and a physical batch ``b`` a child process imports torch, builds the model, the
mode's wrapper and optimizer and one random batch (:class:`benchlib.modes.Trainer`), runs one
step (forward, backward, clip, noise, update) and reports

* CPU: ``peak(b) = ru_maxrss - rss_at_start`` in bytes -- the largest resident set of the
  process (``resource.getrusage``, Linux reports KiB) minus its resident set right after the
  imports, i.e. what the model, optimizer state, data and one step added;
* CUDA: ``torch.cuda.max_memory_allocated`` (the CUDA context is not counted).

The child runs with ``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB, so glibc serves every tensor of
1 MiB or more with its own mapping and returns it on free: the resident set then follows the
live tensors instead of keeping freed heap pages. A fresh process per measurement keeps one
mode's caches and freed pages out of the next mode's figure.

Two or more batch sizes give the linear model ``peak(b) = fixed + b * per_sample`` (least
squares; exact for two points), and the largest physical batch that fits a memory budget
``M``: ``floor((M - fixed) / per_sample)``. Units: bytes in the JSON report (``*_bytes``),
GiB (2^30 bytes) where printed; the budget is given in GB (10^9 bytes, ``--memory-budget-gb``;
80 GB is 74.5 GiB, below the 79.6 GiB an "80 GB" H100 reports, leaving room for the CUDA
context and cuDNN workspaces). CPU memory is a proxy for GPU memory: the same tensors are
saved for backward, but oneDNN may hold reordered copies (CPU) where cuDNN takes workspaces
(GPU). The figures do not depend on the machine's load, unlike the timings.

Run as ``python -m benchlib.memory CONFIG_JSON`` (by :func:`measure_point`); prints one JSON
line.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

GIB = 2**30
_SCRIPTS = str(Path(__file__).resolve().parents[1])
#: the Trainer's reads of the benchmark's argparse namespace
TRAINER_ARGS = ("channels_last", "noise_multiplier", "max_grad_norm", "lr", "seed", "crop",
                "num_classes", "bf16")


def _rss_bytes() -> int:
    """Current resident set of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(cfg: dict) -> dict:
    """One measurement (run in a fresh process): build, one step, report bytes."""
    import opacus  # noqa: F401  (every import before the baseline: libraries are not memory
    import torch  # of the step)

    import patchdp_opacus.fast  # noqa: F401
    import patchdp_opacus.segmentation.losses  # noqa: F401
    import patchdp_opacus.segmentation.models  # noqa: F401
    from benchlib.modes import Trainer, model_builder

    start = _rss_bytes()
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    make = model_builder(cfg["arch"], cfg["encoder"], cfg["output_stride"], cfg["norm"],
                         cfg["num_classes"])
    trainer = Trainer(cfg["mode"], make, cfg["batch"], SimpleNamespace(**cfg["trainer_args"]),
                      device)
    built = _rss_bytes()
    loss = trainer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = {"batch": cfg["batch"], "loss_finite": bool(torch.isfinite(loss.detach()).all()),
           "rss_start_bytes": start, "rss_built_bytes": built,
           "peak_rss_bytes": _peak_rss_bytes()}
    if device.type == "cuda":
        out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        out["method"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_bytes"] = out["peak_rss_bytes"] - start
        out["method"] = "ru_maxrss - rss after imports (MALLOC_MMAP_THRESHOLD_=1MiB)"
    return out


def _trim_parent():
    """Hand freed heap pages of this (parent) process back to the OS before a child runs."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_point(spec: str, arch: str, norm: str, batch: int, args) -> dict:
    """Run :func:`child` in a fresh interpreter; returns its dict or ``{"batch", "error"}``."""
    cfg = {"mode": spec, "arch": arch, "norm": norm, "batch": batch, "device": args.device,
           "encoder": args.encoder, "output_stride": args.output_stride,
           "num_classes": args.num_classes, "threads": args.threads,
           "trainer_args": {k: getattr(args, k) for k in TRAINER_ARGS}}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20), NO_ALBUMENTATIONS_UPDATE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [_SCRIPTS, os.environ.get("PYTHONPATH")])))
    _trim_parent()
    proc = subprocess.run([sys.executable, "-m", "benchlib.memory", json.dumps(cfg)], env=env,
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"batch": batch, "error": f"exit {proc.returncode}: {proc.stderr[-400:]}"}
    return json.loads(lines[-1])


def fit(points: list, budget_bytes: float) -> dict:
    """``peak(b) = fixed + b * per_sample`` by least squares over ``points`` (dicts with
    ``batch`` and ``peak_bytes``), and the largest batch with ``peak(b) <= budget_bytes``."""
    bs = [float(p["batch"]) for p in points]
    ms = [float(p["peak_bytes"]) for p in points]
    if len(set(bs)) < 2:
        raise ValueError("memory fit needs at least two different batch sizes")
    mb, mm = sum(bs) / len(bs), sum(ms) / len(ms)
    slope = sum((b - mb) * (m - mm) for b, m in zip(bs, ms)) / sum((b - mb) ** 2 for b in bs)
    fixed = mm - slope * mb
    fits = math.floor((budget_bytes - fixed) / slope) if slope > 0 else None
    return {"per_sample_bytes": slope, "fixed_bytes": fixed, "budget_bytes": budget_bytes,
            "max_batch_in_budget": fits}


def measure_memory(spec: str, arch: str, norm: str, args, log) -> dict:
    """Peak memory of one step of ``spec`` at each of ``args.memory_batches`` (one process
    each), the linear fit, and the largest batch in ``args.memory_budget_gb`` GB."""
    row = {"arch": arch, "norm": norm, "mode": spec, "points": []}
    for batch in args.memory_batches:
        point = measure_point(spec, arch, norm, batch, args)
        row["points"].append(point)
        if "error" in point:
            log(f"    memory batch {batch}: {point['error']}")
            row["error"] = point["error"]
            return row
        log(f"    memory batch {batch}: peak {point['peak_bytes'] / GIB:.2f} GiB")
    row.update(fit(row["points"], args.memory_budget_gb * 1e9))
    log(f"    memory per sample {row['per_sample_bytes'] / GIB:.3f} GiB, fixed "
        f"{row['fixed_bytes'] / GIB:.2f} GiB, largest batch in {args.memory_budget_gb:g} GB: "
        f"{row['max_batch_in_budget']}")
    return row


def add_ratios(rows: list) -> None:
    """``per_sample_ratio_to_nonprivate`` for each row with a non-private row of its model."""
    base = {(r["arch"], r["norm"]): r.get("per_sample_bytes") for r in rows
            if r["mode"] == "nonprivate"}
    for r in rows:
        ref = base.get((r["arch"], r["norm"]))
        r["per_sample_ratio_to_nonprivate"] = (r["per_sample_bytes"] / ref
                                               if ref and r.get("per_sample_bytes") else None)


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))), flush=True)

#!/usr/bin/env python
"""Run the paper's grid: epsilon x seeds x {patch, record} for one config, on your GPUs.

Every run is one ``patchdp train`` invocation with its own output folder
(``<out>/<accounting>_eps<E>_seed<S>``), so an interrupted grid resumes where it stopped (each
run resumes from its checkpoint; finished runs are skipped).

    # one run at a time on the visible GPU
    python scripts/run_paper_grid.py --config configs/cityscapes/deeplabv3plus.yaml
    # four independent runs at a time, one per GPU
    python scripts/run_paper_grid.py --config configs/cityscapes/pspnet.yaml --gpus 0 1 2 3
    # each run spread over 4 GPUs with torchrun (global batch split across ranks)
    python scripts/run_paper_grid.py --config configs/a2d2/pspnet.yaml --torchrun 4
    # then the paper's Fig. 5
    patchdp plot runs/cityscapes_deeplabv3plus --out fig5.png
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

EPSILONS = [1, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100]
SEEDS = [10, 20, 30, 516]


def build_commands(args) -> list[tuple[Path, list[str]]]:
    name = Path(args.config).stem
    root = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).parent.name}_{name}"
    jobs = []
    for eps, seed, level in itertools.product(args.epsilons, args.seeds, args.accounting):
        out = root / f"{level}_eps{eps:g}_seed{seed}"
        if (out / "final_metrics.json").exists() and not args.rerun:
            continue
        if args.torchrun:
            launcher = [shutil.which("torchrun") or "torchrun", "--standalone",
                        f"--nproc_per_node={args.torchrun}", "-m", "patchdp_opacus.cli"]
        else:
            launcher = [sys.executable, "-m", "patchdp_opacus.cli"]
        cmd = launcher + ["train", "--config", args.config, "--epsilon", f"{eps:g}",
                          "--accounting", level, "--seed", str(seed), "--output", str(out),
                          "--quiet", *args.extra]
        jobs.append((out, cmd))
    return jobs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--epsilons", type=float, nargs="+", default=EPSILONS)
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    p.add_argument("--accounting", nargs="+", default=["patch", "record"],
                   choices=["patch", "record"])
    p.add_argument("--gpus", nargs="+", default=None,
                   help="run independent jobs in parallel, one per listed GPU id")
    p.add_argument("--torchrun", type=int, default=0,
                   help="launch each job with torchrun on this many GPUs")
    p.add_argument("--out", help="grid folder (default runs/<dataset>_<model>)")
    p.add_argument("--rerun", action="store_true", help="also rerun finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after '--': more 'patchdp train' flags, e.g. -- --data-root /data/cs")
    args = p.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    if args.gpus and args.torchrun:
        p.error("use either --gpus (parallel independent runs) or --torchrun (one run, many GPUs)")
    jobs = build_commands(args)
    if args.dry_run or not jobs:
        for _, cmd in jobs:
            print(" ".join(cmd))
        print(f"{len(jobs)} run(s) to do")
        return 0
    slots = args.gpus or [None]
    todo: queue.Queue = queue.Queue()
    for job in jobs:
        todo.put(job)
    failures = []

    def worker(gpu):
        while True:
            try:
                out, cmd = todo.get_nowait()
            except queue.Empty:
                return
            env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(gpu)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "stdout.log", "a") as log:
                rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            print(f"[{'gpu ' + str(gpu) if gpu is not None else 'run'}] {out}: "
                  f"{'ok' if rc == 0 else f'FAILED (exit {rc}, see {out}/stdout.log)'}",
                  flush=True)
            if rc != 0:
                failures.append(out)

    threads = [threading.Thread(target=worker, args=(g,)) for g in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

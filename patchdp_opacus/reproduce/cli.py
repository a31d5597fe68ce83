"""``patchdp reproduce FIGURE ...`` (or ``scripts/reproduce.py FIGURE ...``).

Privacy-only figures (no data) are computed here and written as ``<out>/<figure>.png`` and
``.csv``.  Training figures print the grids they need, their data and GPU time; given
``--data-root`` they run those grids (:mod:`.grid`: ``patchdp train`` per run, finished runs
skipped, interrupted ones resumed) and then draw the figure from the runs' final metrics
(``<out>/<figure>_<dataset>_<model>.png`` and ``.json``, as ``patchdp plot``) or, for Table 1,
write ``<out>/table1.csv``.  Fig. 11-12 do both (their privacy side here, their mIoU side is
training).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["FIGURE_NAMES", "add_arguments", "main", "register", "run"]

_PRIVACY = ("fig2", "fig4", "fig11", "fig12", "fig17", "fig18", "fig19", "fig20", "fig21",
            "fig22", "fig23", "fig24", "fig25", "fig26", "fig27", "fig28")
_TRAINING = ("fig5", "fig11", "fig12", "fig13", "fig14", "table1")
FIGURE_NAMES = tuple(sorted(set(_PRIVACY) | set(_TRAINING),
                            key=lambda n: (n.startswith("table"), int(n.lstrip("figtable") or 0))))
GROUPS = {"privacy": _PRIVACY, "training": _TRAINING, "all": FIGURE_NAMES}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("figures", nargs="+", metavar="FIGURE",
                   help=f"one or more of {', '.join(FIGURE_NAMES)}, or a group: "
                        f"{', '.join(GROUPS)}")
    p.add_argument("--out", default="outputs/reproduce", metavar="DIR",
                   help="folder for the PNG and CSV files (created)")
    p.add_argument("--discretization", type=float, metavar="NATS",
                   help="PLD discretisation for every privacy figure (default: each figure's "
                        "own, stated in its output)")
    p.add_argument("--quick", action="store_true",
                   help="few points and a coarse discretisation (a smoke run, seconds)")
    t = p.add_argument_group("training figures (5, 11-14, table1)")
    t.add_argument("--data-root", action="append", metavar="[DATASET=]PATH",
                   help="run the grids and draw the figure: the data set's folder (repeat as "
                        "cityscapes=PATH a2d2=PATH for figures with several data sets; a grid "
                        "without its data set's root is skipped); without it the grids are "
                        "only printed")
    t.add_argument("--runs", default="runs", metavar="DIR",
                   help="folder of the grids' run folders (DIR/<dataset>_<model>/...)")
    t.add_argument("--only", nargs="+", metavar="TEXT",
                   help="only the grids whose config path contains one of these, e.g. resnet18")
    t.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="config override passed to every run (patchdp train --set)")
    from patchdp_opacus.reproduce.grid import add_arguments as grid_arguments

    grid_arguments(t, config=False)


def run(args) -> int:
    names = []
    for name in args.figures:
        for n in GROUPS.get(name, (name,)):
            if n not in FIGURE_NAMES:
                print(f"reproduce: error: unknown figure {n!r}; choose from "
                      f"{', '.join(FIGURE_NAMES)} or {', '.join(GROUPS)}", file=sys.stderr)
                return 2
            if n not in names:
                names.append(n)
    from patchdp_opacus.reproduce.figures import PRIVACY_FIGURES
    from patchdp_opacus.reproduce.training import TRAINING_FIGURES, instructions

    out = Path(args.out)
    for name in names:
        if name in PRIVACY_FIGURES:
            out.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            result = PRIVACY_FIGURES[name].make(out, name, quick=args.quick,
                                                discretization=args.discretization)
            print(f"{name}: {PRIVACY_FIGURES[name].title}")
            for note in result.notes:
                print(f"  {note}")
            print(f"  wrote {result.png} and {result.csv} ({time.perf_counter() - start:.0f} s)")
        if name in TRAINING_FIGURES:
            if not args.data_root:
                print("\n".join(instructions(name)))
                continue
            code = run_training_figure(name, args, out)
            if code:
                return code
    return 0


def _roots(values) -> dict:
    """``--data-root`` values as ``{dataset or None: path}`` (None: every data set)."""
    roots = {}
    for value in values or ():
        name, sep, path = value.partition("=")
        if sep and "/" not in name and name:
            roots[name] = path
        else:
            roots[None] = value
    return roots


def _config_path(config: str) -> str:
    """A shipped config, found from the working directory or the source checkout."""
    if Path(config).is_file():
        return config
    checkout = Path(__file__).resolve().parents[2] / config
    return str(checkout) if checkout.is_file() else config


def run_training_figure(name: str, args, out: Path) -> int:
    """Run the grids of training figure ``name`` (those with a data root) and draw it."""
    from patchdp_opacus.reproduce.grid import build_jobs, grid_root, run_jobs
    from patchdp_opacus.reproduce.training import TRAINING_FIGURES

    fig = TRAINING_FIGURES[name]
    roots = _roots(args.data_root)
    done = []
    for grid in fig.grids:
        if args.only and not any(text in grid.config for text in args.only):
            continue
        root = roots.get(grid.dataset, roots.get(None))
        if root is None:
            print(f"{name}: skipped {grid.config} (no --data-root {grid.dataset}=PATH)")
            continue
        folder = grid_root(grid.config, Path(args.runs) / f"{grid.dataset}_"
                                                         f"{Path(grid.config).stem}")
        extra = ["--data-root", root] + [a for o in args.overrides or () for a in ("--set", o)]
        jobs = build_jobs(_config_path(grid.config),
                          epsilons=grid.epsilons if grid.epsilons == (None,) else args.epsilons,
                          seeds=args.seeds, accountings=grid.accountings,
                          sigma_augs=args.sigma_aug, out=folder, extra=extra,
                          torchrun=args.torchrun, rerun=args.rerun)
        print(f"{name}: {grid.config}: {len(jobs)} run(s) to do in {folder}")
        if args.dry_run:
            for job in jobs:
                print("  " + " ".join(job.cmd))
            continue
        failures = run_jobs(jobs, args.gpus, echo=lambda m: print(f"  {m}", flush=True))
        if failures:
            print(f"{name}: {len(failures)} run(s) failed; see their stdout.log", file=sys.stderr)
            return 1
        done.append((grid, folder))
    if args.dry_run or not done:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if fig.table:
        path = out / f"{name}.csv"
        rows = accuracy_table(done)
        _write_table(path, rows)
        for r in rows:
            print(f"  {r['config']}: accuracy {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f}"
                  f" over {r['seeds']} seed(s) ({r['split']} split)")
        print(f"{name}: wrote {path}")
        return 0
    from patchdp_opacus.commands.training import _read_final, _run_dirs, aggregate_runs, \
        plot_runs

    for grid, folder in done:
        points = aggregate_runs([_read_final(d) for d in _run_dirs([str(folder)])])
        stem = f"{name}_{grid.dataset}_{Path(grid.config).stem}"
        plot_runs(points, out / f"{stem}.png")
        (out / f"{stem}.json").write_text(json.dumps(points, indent=2) + "\n")
        print(f"{name}: wrote {out / stem}.png ({len(points)} points)")
    return 0


def accuracy_table(done) -> list[dict]:
    """Table 1: per grid (config), mean and std of the runs' top-1 accuracy over seeds."""
    import numpy as np

    from patchdp_opacus.commands.training import _read_final, _run_dirs

    rows = []
    for grid, folder in done:
        finals = [_read_final(d) for d in _run_dirs([str(folder)])]
        acc = [f["accuracy"] for f in finals if f.get("accuracy") is not None]
        rows.append({"config": grid.config, "seeds": len(acc),
                     "accuracy_mean": float(np.mean(acc)) if acc else float("nan"),
                     "accuracy_std": float(np.std(acc)) if acc else float("nan"),
                     "split": finals[0].get("split") if finals else None})
    return rows


def _write_table(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def register(subparsers) -> None:
    """Add ``reproduce`` to the ``patchdp`` parser (cheap to import: nothing heavy at import)."""
    p = subparsers.add_parser("reproduce", help="one command per figure of the paper",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(handler=run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

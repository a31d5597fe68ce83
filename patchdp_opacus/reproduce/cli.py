"""``scripts/reproduce.py FIGURE ...`` (or, once registered, ``patchdp reproduce FIGURE``).

Privacy-only figures (no data) are computed here and written as ``<out>/<figure>.png`` and
``.csv``; training figures print the grid command they need, their data and GPU time. Fig. 11-12
do both (their privacy side here, their mIoU side is training).
"""

from __future__ import annotations

import argparse
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
            print("\n".join(instructions(name)))
    return 0


def register(subparsers) -> None:
    """Add ``reproduce`` to the ``patchdp`` parser (cheap to import: nothing heavy at import)."""
    p = subparsers.add_parser("reproduce", help="one command per figure of the paper",
                              description=__doc__)
    add_arguments(p)
    p.set_defaults(handler=run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="reproduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
